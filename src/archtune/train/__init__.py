"""Training: the recipe, a thin transformers.Trainer subclass, callbacks and outputs."""
