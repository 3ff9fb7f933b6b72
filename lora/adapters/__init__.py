"""lora.adapters."""
