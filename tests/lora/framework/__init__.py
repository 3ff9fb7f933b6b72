"""tests.lora.framework."""
