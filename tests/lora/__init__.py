"""tests.lora."""
