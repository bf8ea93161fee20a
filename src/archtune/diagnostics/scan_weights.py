"""`archtune scan-weights MODEL_DIR --rule PATTERN=THRESHOLD [--fix OUT_DIR]`: the
weight-scale check (archtune.models.weight_scales) on a safetensors checkpoint directory,
sharded or not, with no model class needed."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from archtune.errors import Problem, UserError
from archtune.models.weight_scales import (ScaleRule, WeightScaleResult, coerce_rules, named_list, rescale_,
                                           scan_tensors)


def parse_rule_arg(text: str) -> ScaleRule:
    """``"PATTERN=THRESHOLD"`` (the ``--rule`` argument) -> ScaleRule.

    The threshold follows the last ``=`` so a pattern may itself hold ``=``.
    Raises UserError (key ``--rule``) on bad syntax, an invalid regex or threshold <= 1.
    """
    fix = r"--rule 'linear_attn\.conv1d\.weight=1.3' (a regex, '=', a threshold > 1)"
    if not isinstance(text, str) or "=" not in text:
        raise UserError.single("--rule", f"expected PATTERN=THRESHOLD, got {text!r}", fix)
    pattern, _, thr_text = text.rpartition("=")
    pattern, thr_text = pattern.strip(), thr_text.strip()
    if not pattern:
        raise UserError.single("--rule", f"empty pattern in {text!r}", fix)
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UserError.single("--rule", f"invalid regex {pattern!r}: {exc}", fix) from None
    try:
        threshold = float(thr_text)
    except ValueError:
        raise UserError.single("--rule", f"threshold {thr_text!r} in {text!r} is not a number", fix) from None
    if not math.isfinite(threshold) or threshold <= 1:
        raise UserError.single("--rule", f"threshold must be > 1, got {thr_text!r}", fix)
    return ScaleRule(pattern, threshold)

# --------------------------------------------------------------------------- checkpoint directories


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError.single(str(index), f"unreadable safetensors index: {exc}",
                                   "restore model.safetensors.index.json from the original checkpoint") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise UserError.single(str(index), f"shard(s) listed but missing: {', '.join(missing)}",
                                   "download the complete checkpoint")
        return [model_dir / n for n in names]
    return sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())


def scan_model_dir(model_dir: str | os.PathLike, rules: Any,
                   fix_out_dir: str | os.PathLike | None = None) -> WeightScaleResult:
    """Scan the safetensors checkpoint in `model_dir` (any architecture; sharded with
    model.safetensors.index.json or not). Only tensors matched by a rule are read.

    Without `fix_out_dir` nothing is written and every rule is treated as a dry run
    (outliers are reported as "outlier (dry run)"). With it, OUT_DIR receives the whole
    checkpoint: shards holding a rescaled tensor are rewritten (all their tensors, same
    file names and header metadata, dtypes unchanged), every other file (other shards,
    config.json, tokenizer files, the index json, ...) is copied unchanged. Dry-run rules
    change nothing.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = Path(model_dir)
    if not src.is_dir():
        raise UserError.single("MODEL_DIR", f"{src} is not a directory", "give a local checkpoint directory")
    files = _safetensors_files(src)
    if not files:
        raise UserError.single("MODEL_DIR", f"no *.safetensors file in {src}",
                               "give a directory written by save_pretrained(safe_serialization=True)")
    rule_list = coerce_rules(rules)
    out: Path | None = None
    if fix_out_dir is not None:
        out = Path(fix_out_dir)
        if out.exists() and out.resolve() == src.resolve():
            raise UserError.single("--fix", "OUT_DIR must differ from MODEL_DIR", "choose a new directory")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError.single("--fix", f"{out} exists and is not an empty directory",
                                   "choose a new or empty directory")

    regexes = [re.compile(r.name_pattern) for r in rule_list]
    items: list[tuple[str, torch.Tensor]] = []
    file_of: dict[str, Path] = {}
    problems: list[Problem] = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in file_of:
                    problems.append(Problem(str(path), f"tensor {name!r} also in {file_of[name].name}",
                                            "remove the duplicate checkpoint file"))
                    continue
                file_of[name] = path
                if any(rx.search(name) for rx in regexes):
                    items.append((name, f.get_tensor(name)))
    if problems:
        raise UserError(problems)

    # Plan only: the tensors read here are never modified (the fix goes to fresh copies).
    rows, warns, factors = scan_tensors(named_list(items), rule_list, force_dry_run=out is None)
    result = WeightScaleResult(rows=rows, warnings=warns, n_rescaled=len(factors), scales=dict(factors))
    if out is None:
        return result

    out.mkdir(parents=True, exist_ok=True)
    fixed_by_file: dict[Path, dict[str, float]] = {}
    for name, factor in result.scales.items():
        fixed_by_file.setdefault(file_of[name], {})[name] = factor
    for path in files:
        target = out / path.name
        changes = fixed_by_file.get(path)
        if not changes:
            shutil.copy2(path, target)
            continue
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(path))
        with torch.no_grad():
            for name, factor in changes.items():
                rescale_(tensors[name], factor)
        save_file(tensors, str(target), metadata=metadata)
    written = {p.name for p in files}
    for entry in sorted(src.iterdir()):
        if entry.name in written or entry.name in (".git", ".cache"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / entry.name, dirs_exist_ok=True)
        elif entry.is_file():
            shutil.copy2(entry, out / entry.name)
    return result


__all__ = ["parse_rule_arg", "scan_model_dir"]
