"""Hugging Face ``transformers`` models in svdq: local checkpoints (``hf:DIR``) and their Megatron twins."""
