"""Adapters: freezing and LoRA, driven by the Plan."""
