"""The model's skeleton: what a config.json builds, found on the meta device (no weights).

Shared by the plan's rules (LoRA targets, the FSDP wrap class, packing) and the generated docs
(docs/scenarios.py).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MissingLibraries", "ModelStructure", "StructureUnavailable", "TORCHVISION_INSTALL", "install_lines",
           "missing_backends", "model_structure"]


class StructureUnavailable(Exception):
    """The model could not be built on the meta device (unknown model_type, remote code, ...)."""


class MissingLibraries(StructureUnavailable):
    """The model's classes need libraries that are not installed: transformers' `requires_backends`
    refused to build them (e.g. TimmWrapperModel, Gemma 3n's vision tower, without timm)."""

    def __init__(self, message: str, backends: tuple[str, ...]):
        super().__init__(message)
        self.backends = backends


# What to run when a part needs torchvision: the build that matches the installed torch (a plain
# `pip install torchvision` may bring another torch, or a CUDA build beside a CPU torch).
TORCHVISION_INSTALL = ("install the torchvision build matching your torch, e.g. for a CPU torch: "
                       "pip install torchvision --index-url https://download.pytorch.org/whl/cpu")


def missing_backends(exc: ImportError) -> tuple[str, ...]:
    """The transformers backends (names of its BACKENDS_MAPPING: timm, torchvision, ...) that `exc`,
    raised by transformers' `requires_backends`, reports missing; () for another ImportError."""
    from transformers.utils.import_utils import BACKENDS_MAPPING

    text, seen, out = str(exc), set(), []
    for name, (available, message) in BACKENDS_MAPPING.items():
        # The message after the class name ("{0} requires the timm library but ...") identifies the backend.
        tail = message.split("{0}", 1)[-1].strip()[:60]
        if tail and tail in text and tail not in seen and not available():
            seen.add(tail)
            out.append(name)
    return tuple(out)


# Backends whose package imports torchvision (timm's models are torchvision-based): without a
# torchvision, `pip install timm` would pick one for the newest torch, not the installed one.
NEEDS_TORCHVISION = ("timm",)


def install_lines(backends: tuple[str, ...], message: str) -> str:
    """How to install `backends`: the `pip install` lines transformers' own message gives, the
    torch-matching torchvision build (first, where a backend needs one and none is installed),
    else `pip install NAME`."""
    import importlib.util
    import re

    given = dict.fromkeys(re.findall(r"`(pip install [^`]+)`", message))
    if importlib.util.find_spec("torchvision") is None and any(b in NEEDS_TORCHVISION for b in backends):
        backends = ("torchvision", *backends)
    lines = [TORCHVISION_INSTALL if b == "torchvision" else None for b in backends]
    lines = [line for line in lines if line] + [line for line in given if "torchvision" not in line]
    named = " ".join(line.split()[-1] for line in given)
    lines += [f"pip install {b}" for b in backends if b != "torchvision" and b not in named]
    return "; ".join(dict.fromkeys(lines))


@dataclass(frozen=True)
class ModelStructure:
    """What the model built from config.json contains, found without weights or memory.

    The model is instantiated on torch's meta device (tensors have shapes, no storage), so even
    a 30B config takes about a second and allocates nothing.
    """

    auto_class: str
    module_names: tuple[str, ...]
    class_names: frozenset[str]
    parameters: dict[str, tuple[int, ...]]  # parameter name -> shape
    no_split_modules: tuple[str, ...]  # transformers' `_no_split_modules` (may name absent classes)
    module_classes: dict[str, str] = field(default_factory=dict)  # module name -> its class name

    @property
    def model_class(self) -> str:
        """Class name of the model itself (what the Auto class built)."""
        return self.module_classes.get("", "")

    def class_of(self, module_name: str) -> str | None:
        """Class name of the module `module_name` (dotted), or None when the model has none."""
        return self.module_classes.get(module_name) if module_name else None

    def parameters_matching(self, target: str) -> list[str]:
        """Parameter names PEFT's `target_parameters` entry `target` hits (equal, or a dotted suffix)."""
        return [n for n in self.parameters if n == target or n.endswith("." + target)]


_STRUCTURES: dict[str, ModelStructure | StructureUnavailable] = {}


def model_structure(model_config: dict[str, Any], auto_class: str) -> ModelStructure:
    """The meta-device skeleton of the model `model_config` describes (cached per config).

    `auto_class` is the transformers Auto class the model trains with; AutoModelForCausalLM is
    tried next (e.g. a text-only checkpoint of a multimodal family). Raises StructureUnavailable.
    """
    key = json.dumps([auto_class, model_config], sort_keys=True, default=str)
    cached = _STRUCTURES.get(key)
    if cached is None:
        try:
            cached = _build_structure(copy.deepcopy(model_config), auto_class)
        except StructureUnavailable as exc:
            cached = exc
        _STRUCTURES[key] = cached
    if isinstance(cached, StructureUnavailable):
        raise cached
    return cached


def meta_model(model_config: dict[str, Any], auto_class: str):
    """The model `model_config` describes, built on the meta device (shapes, no storage): a fresh
    instance each call. Raises StructureUnavailable."""
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = model_config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise StructureUnavailable(f"transformers {transformers.__version__} has no model_type {model_type!r}")
    try:
        config = CONFIG_MAPPING[model_type].from_dict(copy.deepcopy(model_config))
    except Exception as exc:  # a config.json transformers rejects
        raise StructureUnavailable(f"config.json does not load as {model_type!r}: {exc}") from None
    errors = []
    for name in dict.fromkeys((auto_class, "AutoModelForCausalLM")):
        try:
            # fork_rng: weight init on meta tensors must not touch the caller's random state.
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                model = getattr(transformers, name).from_config(config)
        except ImportError as exc:  # transformers' requires_backends: loading the weights would fail the same way
            backends = missing_backends(exc)
            if backends:
                raise MissingLibraries(" ".join(str(exc).split()), backends) from None
            errors.append(f"{name}: {exc}")
            continue
        except Exception as exc:  # e.g. the Auto class has no mapping for this config
            errors.append(f"{name}: {exc}")
            continue
        model.archtune_auto_class = name
        return model
    raise StructureUnavailable("; ".join(errors))


def _build_structure(model_config: dict[str, Any], auto_class: str) -> ModelStructure:
    model = meta_model(model_config, auto_class)
    return ModelStructure(
        auto_class=model.archtune_auto_class,
        module_names=tuple(n for n, _ in model.named_modules()),
        class_names=frozenset(type(m).__name__ for m in model.modules()),
        parameters={n: tuple(p.shape) for n, p in model.named_parameters()},
        no_split_modules=tuple(getattr(model, "_no_split_modules", None) or ()),
        module_classes={n: type(m).__name__ for n, m in model.named_modules()},
    )
