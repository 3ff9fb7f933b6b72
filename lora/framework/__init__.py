"""lora.framework."""
