"""The plan: every setting a run uses, decided once, with its value, source and reason.

`resolve(config, model_config)` runs the generic rules (rules.py) and then the family's own,
on the model's config.json and its meta-device skeleton (structure.py); nothing after it
decides again.
"""
from archtune.plan.resolver import SOURCES, Decision, Plan, Rule, Source, resolve
from archtune.plan.structure import ModelStructure, StructureUnavailable, model_structure

__all__ = ["Decision", "Plan", "Rule", "Source", "SOURCES", "ModelStructure", "StructureUnavailable",
           "model_structure", "resolve"]
