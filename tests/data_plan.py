"""The plan the data pipeline reads (`plan.data`), for data tests that need no model.

Data decisions do not depend on the model, so any config.json resolves them; the tiny Llama's is used.
"""
from __future__ import annotations

import copy
import functools

from archtune.plan import Plan, resolve


@functools.cache
def _llama_config() -> dict:
    from archtune.models.tiny import build_tiny_config

    return build_tiny_config("llama").to_dict()


def data_plan(cfg) -> Plan:
    """The plan of `cfg` (errors left in plan.errors: the data tests check the pipeline's own)."""
    return resolve(cfg, copy.deepcopy(_llama_config()))
