"""Score heads transformers lacks: a reward model for a family with no *ForSequenceClassification
class (transformers 5.24: Gemma 4, Qwen 3.5 MoE).

transformers builds its own sequence-classification classes for these models' siblings from two
parts: `Gemma3ForSequenceClassification(GenericForSequenceClassification, Gemma3PreTrainedModel)`,
likewise Qwen 3.5's. The generic part puts the family's base model (`AutoModel.from_config`: the
multimodal wrapper's `model`, with `model.language_model` and the towers, so every module keeps the
name the family's rules and LoRA targets use) under a one-output `score` on the text hidden size,
and reads the score at the last non-padding token. The family names its PreTrainedModel class
(`Family.sequence_classification_base`); the Plan records the class built (`reward_head_class`);
here it is built the same way and registered with AutoModelForSequenceClassification for the
model's config class, so loading, tiny models, PEFT and saving all go through transformers' own
Auto class.
"""
from __future__ import annotations

import importlib

from archtune.plan import Plan
from archtune.plan.preference import head_class_name


def _resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def register_score_head(plan: Plan):
    """Register the Plan's generic reward head (`reward_head_class`) for the model's config class;
    returns the class, or None when the Plan builds no such head. Idempotent."""
    name = plan.model.reward_head_class
    if not name:
        return None
    return _register(plan.model_type, plan.family.sequence_classification_base, name)


def register_score_heads() -> dict[str, type]:
    """Register every family's generic reward head with AutoModelForSequenceClassification, for each
    model type it claims that transformers gives no sequence-classification class; returns
    {model_type: class}. What a saved reward model of such a family needs before transformers loads it:

        from archtune.models.heads import register_score_heads
        register_score_heads()
        model = AutoModelForSequenceClassification.from_pretrained(DIR)   # merged, or the base + PeftModel
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as native

    from archtune.families import all_families

    out = {}
    for family in all_families():
        base = family.sequence_classification_base
        for model_type in family.model_types if base else ():
            if model_type not in native:
                out[model_type] = _register(model_type, base, head_class_name(base))
    return out


def _register(model_type: str, base_path: str, name: str):
    from transformers import AutoModelForSequenceClassification
    from transformers.modeling_layers import GenericForSequenceClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    mapping = AutoModelForSequenceClassification._model_mapping
    if config_class in mapping:
        return mapping[config_class]
    base = _resolve(base_path)
    cls = type(name, (GenericForSequenceClassification, base),
               {"__module__": __name__, "config_class": config_class,
                "__doc__": f"{base.__name__} under transformers' generic one-output score head."})
    # exist_ok: without it transformers silently skips a config class of its own (a native config is
    # assumed to map to its native model already)
    AutoModelForSequenceClassification.register(config_class, cls, exist_ok=True)
    return cls


__all__ = ["register_score_head", "register_score_heads"]
