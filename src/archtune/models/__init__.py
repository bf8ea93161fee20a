"""Model building and loading. `tiny` builds the embedded tiny models families declare."""
from archtune.models.tiny import build_tiny_config, build_tiny_model, tiny_model_names, write_tiny_model

__all__ = ["build_tiny_config", "build_tiny_model", "tiny_model_names", "write_tiny_model"]
