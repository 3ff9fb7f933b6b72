"""lora.io."""
