"""LoRA aimed at a wrapper PEFT cannot adapt lands on the nn.Linear inside it.

PEFT refuses some custom linear wrappers as LoRA targets ("Target module Gemma4ClippableLinear(...)
is not supported"). A family names them in `lora_target_redirects` ({wrapper class name:
attribute of the inner nn.Linear}); the resolved target names are rewritten here, before PEFT
sees them, so PEFT itself is never modified.
"""
from __future__ import annotations

from typing import Iterable

import torch

from archtune.patches import Patch, register_patch


def redirect_targets(modules: dict[str, torch.nn.Module], names: Iterable[str],
                     redirects: dict[str, str]) -> set[str]:
    """`names` (module names of `modules`) with each redirected wrapper replaced by its inner linear.

    `...q_proj` of class Gemma4ClippableLinear with redirects {"Gemma4ClippableLinear": "linear"}
    becomes `...q_proj.linear`; other names are kept. A wrapper without the named submodule is a
    RuntimeError (the family's declaration no longer fits the model).
    """
    targets: set[str] = set()
    for name in names:
        attr = redirects.get(type(modules[name]).__name__)
        if attr is None:
            targets.add(name)
            continue
        inner = f"{name}.{attr}"
        if inner not in modules:
            raise RuntimeError(f"lora_target_redirects sends {type(modules[name]).__name__} to `.{attr}`, but "
                               f"{name} has no such submodule")
        targets.add(inner)
    return targets


LORA_REDIRECT = register_patch(Patch(
    name="lora_target_redirect",
    doc="LoRA aimed at a wrapper PEFT rejects (a family's `lora_target_redirects`, e.g. Gemma4ClippableLinear) "
        "lands on the nn.Linear inside it.",
    apply=redirect_targets,
    upstream="transformers 5.25.0, peft 0.21.2",
    relies_on={"transformers.models.gemma4.modeling_gemma4.Gemma4ClippableLinear": "18e84f3bc65d"},
))

__all__ = ["redirect_targets"]
