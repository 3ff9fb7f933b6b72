"""tests.lora.io."""
