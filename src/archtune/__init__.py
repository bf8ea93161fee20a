"""archtune: one YAML file in, a correct and fast fine-tune out."""

__version__ = "0.1.0"
