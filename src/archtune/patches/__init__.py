"""Every runtime change archtune makes to a transformers or PEFT class or function, in one place.

- packing.py: Gated DeltaNet state reset at packed document boundaries ("gated_deltanet_packing"),
  per-document attention ("sdpa_packed"), and `prepare_model_for_packing` (a family declares its
  packing patches by name);
- expert_lora.py: reading PEFT's LoRA parametrization of 3D expert tensors as factors, and
  skipping PEFT's per-forward parametrization check on expert ParamWrappers;
- lora_redirect.py: LoRA aimed at a wrapper PEFT cannot adapt (Gemma 4's ClippableLinear) lands
  on the nn.Linear inside it;
- text_only.py: the zero "no multimodal token" inputs a multimodal wrapper's forward takes on
  text-only batches;
- peft_targets.py: LoRA targets naming real modules stay on them under PEFT's transformers-v5 MoE
  config conversion (Qwen3-Next's shared expert);
- fsdp_accumulation.py: FSDP2's own switch for the Trainer's deferred gradient reduction;
- meta_forward.py: the fused attention and balanced experts the memory estimate's meta-device
  forward runs (`check --memory`).

Each registers a `Patch` in PATCHES (discovered: every module of this package) naming the
upstream version it was written against and the upstream code it relies on, each with a
fingerprint of that code's source. tests/unit/test_patches.py recomputes the fingerprints: when
upstream changes under a patch, that test fails and says which patch to re-verify.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from archtune.registry import Registry


@dataclass(frozen=True)
class Patch:
    """A runtime change to an upstream class or function.

    `apply` is the patch's entry point; `upstream` the library versions it was written and
    tested against; `relies_on` maps the dotted path of each upstream function or class whose
    code the patch copies, replaces or depends on to the fingerprint of its source
    (`upstream_fingerprint`) in that version. `doc` is one sentence for the generated docs.
    """

    name: str
    doc: str
    apply: Callable[..., Any]
    upstream: str = ""
    relies_on: dict[str, str] = field(default_factory=dict)
    # "packing": apply(model) -> layers patched, run by prepare_model_for_packing for the patches a
    # family names in `Family.patches`.
    kind: str = ""


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


PATCHES: Registry[Patch] = Registry("patch", "src/archtune/patches/", discover=_discover)


def register_patch(patch: Patch) -> Patch:
    if not patch.name.isidentifier() or patch.name != patch.name.lower():
        raise KeyError(f"patch name {patch.name!r} must be a lower-case identifier (src/archtune/patches/)")
    if not patch.upstream or not patch.relies_on:
        raise ValueError(f"patch {patch.name!r} must name the upstream version it targets and the upstream code "
                         "it relies on (`upstream`, `relies_on`)")
    return PATCHES.register(patch.name, patch)


def resolve_dotted(path: str) -> Any:
    """`package.module.Class.attr` -> the object (the longest importable module prefix first)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def upstream_source(path: str) -> str:
    """The source of the upstream function or class at `path`, decorators included.

    A decorator may replace a module-level function with an object that has no source of its
    own (transformers >= 5.25 with `kernels` installed turns `torch_chunk_gated_delta_rule`
    into an nn.Module instance that dispatches to hub kernels): then the definition named by
    `path` is read from its module's file.
    """
    obj = resolve_dotted(path)
    try:
        return inspect.getsource(obj)
    except TypeError:
        module_path, _, name = path.rpartition(".")
        module = resolve_dotted(module_path)
        text = inspect.getsource(module)
        for node in ast.parse(text).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                return "".join(text.splitlines(keepends=True)[start - 1:node.end_lineno])
        raise


def upstream_fingerprint(path: str) -> str:
    """First 12 hex digits of the SHA-256 of the source of the upstream object at `path`."""
    return hashlib.sha256(upstream_source(path).encode("utf-8")).hexdigest()[:12]


__all__ = ["PATCHES", "Patch", "register_patch", "resolve_dotted", "upstream_fingerprint", "upstream_source"]
