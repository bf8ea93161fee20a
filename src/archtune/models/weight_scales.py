"""Weight-scale drift detection and repair (`normalize_weight_scales`).

Some checkpoints carry a few tensors whose scale has drifted away from their siblings;
Qwen 3.5 MoE's late DeltaNet layers are the known case (`linear_attn.conv1d.weight`,
rare-expert / AdamW interaction). A rule names a family of sibling tensors by regex and
a threshold; every tensor of the family whose standard deviation is too far from the
family's median is an outlier and (unless the rule is a dry run) rescaled back to it.

Algorithm, per rule, in rule order:

1. every floating-point tensor whose name matches ``re.search(rule.name_pattern, name)``;
2. std of each, computed in float64 (two passes, chunked; Bessel-corrected, like
   ``torch.std``). Tensors with fewer than 2 elements, a non-finite std or std 0 (a
   constant tensor such as a freshly initialised norm weight) are reported "skipped"
   and take no part in the median;
3. median of the remaining stds. **Median convention: the lower median** (for an even
   count n, the (n/2)-th smallest value, i.e. index ``(n - 1) // 2`` of the sorted stds),
   which is what ``torch.median`` returns; it is always one of the observed stds;
4. ratio = std / median; outlier when ratio > threshold or ratio < 1 / threshold;
5. unless dry run, an outlier is multiplied by median / std (the product is computed in
   float64 and rounded once to the tensor's own dtype, so the dtype never changes).

A rule with fewer than 3 usable matches changes nothing and yields a warning (so does a
rule that matches nothing). When several rules match one tensor, a later rule sees the
tensor as the earlier rules left it.

Determinism and distributed training: the result depends only on the weights (no RNG,
float64 statistics, a sort for the median). Every rank loads the same base weights and
runs this at load time, before adapters are attached and before any sharding, so every
rank computes the same stds, the same medians and the same factors and ends with the
same weights; no collective is needed.

Public API:

* :func:`scan_weight_scales` - pure: name->tensor pairs in, report rows out, nothing changed.
* :func:`normalize_weight_scales` - apply to a model (``named_parameters``) or to named tensors, in place.
* :func:`render_table` - a ``rich`` table of a result.
* archtune.diagnostics.scan_weights - the same on a safetensors checkpoint directory
  (``archtune scan-weights``).
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from archtune.errors import UserError

log = logging.getLogger(__name__)

ACTION_OK = "ok"
ACTION_RESCALED = "rescaled"
ACTION_DRY_RUN = "outlier (dry run)"
ACTION_SKIPPED = "skipped"
ACTIONS = (ACTION_OK, ACTION_RESCALED, ACTION_DRY_RUN, ACTION_SKIPPED)

MIN_MATCHES = 3
_CHUNK = 1 << 22  # elements per float64 chunk: bounds the extra memory to 32 MiB per tensor


# --------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class ScaleRule:
    """One rule: regex over tensor names, threshold (> 1), dry_run (flag only)."""

    name_pattern: str
    threshold: float
    dry_run: bool = False


@dataclass(frozen=True)
class ScaleReport:
    """One row: one tensor under one rule."""

    rule: str  # the rule's name_pattern
    name: str  # tensor (parameter / state-dict) name
    std: float  # float64 std of the tensor as this rule saw it (nan when not computable)
    median: float  # median std of the rule's usable matches (nan when the rule was skipped)
    ratio: float  # std / median (nan when skipped)
    action: str  # one of ACTIONS
    scale: float = 1.0  # factor applied (or planned, for "rescaled"); 1.0 otherwise
    note: str = ""  # why a row was skipped

    @property
    def outlier(self) -> bool:
        return self.action in (ACTION_RESCALED, ACTION_DRY_RUN)

    @property
    def std_after(self) -> float:
        return self.std * self.scale

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule, "name": self.name, "std": self.std, "median": self.median,
            "ratio": self.ratio, "action": self.action, "scale": self.scale, "note": self.note,
        }


@dataclass
class WeightScaleResult:
    rows: list[ScaleReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    n_rescaled: int = 0  # distinct tensors changed
    scales: dict[str, float] = field(default_factory=dict)  # tensor name -> total factor applied

    @property
    def outliers(self) -> list[ScaleReport]:
        return [r for r in self.rows if r.outlier]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.to_dict() for r in self.rows], "warnings": list(self.warnings),
            "n_rescaled": self.n_rescaled, "scales": dict(self.scales),
        }


# --------------------------------------------------------------------------- rules


def _coerce_rule(rule: Any, index: int, key_prefix: str = "normalize_weight_scales") -> ScaleRule:
    """ScaleRule from a ScaleRule, config WeightScaleRule (dry_run read with getattr) or mapping."""
    if isinstance(rule, Mapping):
        pattern, threshold, dry_run = rule.get("name_pattern"), rule.get("threshold"), rule.get("dry_run", False)
    else:
        pattern = getattr(rule, "name_pattern", None)
        threshold = getattr(rule, "threshold", None)
        dry_run = getattr(rule, "dry_run", False)
    key = f"{key_prefix}[{index}]"
    if not isinstance(pattern, str) or not pattern:
        raise UserError.single(f"{key}.name_pattern", "missing or empty regex",
                               r"e.g. name_pattern: 'linear_attn\.conv1d\.weight'")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UserError.single(f"{key}.name_pattern", f"invalid regex {pattern!r}: {exc}",
                               "escape literal dots as \\.") from None
    try:
        thr = float(threshold)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError.single(f"{key}.threshold", f"not a number: {threshold!r}", "e.g. threshold: 1.3") from None
    if not math.isfinite(thr) or thr <= 1:
        raise UserError.single(f"{key}.threshold", f"must be a finite number > 1, got {threshold!r}",
                               "e.g. threshold: 1.3")
    return ScaleRule(pattern, thr, bool(dry_run))


def coerce_rules(rules: Any) -> list[ScaleRule]:
    if rules is None:
        return []
    if isinstance(rules, (ScaleRule, Mapping)) or hasattr(rules, "name_pattern"):
        rules = [rules]
    return [_coerce_rule(r, i) for i, r in enumerate(rules)]


# --------------------------------------------------------------------------- numerics


def tensor_std(t: torch.Tensor) -> float:
    """Bessel-corrected std in float64 (two passes over fixed-size chunks: deterministic,
    bounded extra memory). nan for fewer than 2 elements."""
    n = t.numel()
    if n < 2:
        return float("nan")
    flat = t.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, n, _CHUNK):
        total += flat[start:start + _CHUNK].to(torch.float64).sum()
    mean = total / n
    sq = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, n, _CHUNK):
        d = flat[start:start + _CHUNK].to(torch.float64) - mean
        sq += (d * d).sum()
    return math.sqrt(float(sq) / (n - 1))


def lower_median(values: Sequence[float]) -> float:
    """The lower median (torch.median semantics): sorted(values)[(n - 1) // 2]."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


@torch.no_grad()
def rescale_(t: torch.Tensor, factor: float) -> None:
    """t *= factor in place: product in float64, rounded once to t's dtype."""
    if t.is_contiguous():
        flat = t.view(-1)
        for start in range(0, flat.numel(), _CHUNK):
            part = flat[start:start + _CHUNK]
            part.copy_(part.to(torch.float64) * factor)
    else:
        t.copy_(t.to(torch.float64) * factor)


# --------------------------------------------------------------------------- core


def _storage_key(t: torch.Tensor) -> Any:
    if t.device.type == "meta" or t.numel() == 0:
        return ("id", id(t))
    try:
        return (str(t.device), t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
    except RuntimeError:  # tensor subclasses without storage
        return ("id", id(t))


def named_list(named_tensors: Any) -> list[tuple[str, torch.Tensor]]:
    if hasattr(named_tensors, "named_parameters") and callable(named_tensors.named_parameters):
        items = list(named_tensors.named_parameters())
    elif isinstance(named_tensors, Mapping):
        items = list(named_tensors.items())
    else:
        items = list(named_tensors)
    # Drop aliases (tied weights given twice, e.g. by state_dict()): counted and scaled once.
    seen: set[Any] = set()
    out: list[tuple[str, torch.Tensor]] = []
    for name, t in items:
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        out.append((name, t))
    return out


def scan_tensors(items: list[tuple[str, torch.Tensor]], rules: list[ScaleRule], force_dry_run: bool
          ) -> tuple[list[ScaleReport], list[str], dict[str, float]]:
    rows: list[ScaleReport] = []
    warnings: list[str] = []
    factors: dict[str, float] = {}  # pending factor per tensor name, so later rules see earlier fixes
    base_std: dict[str, float] = {}  # float64 std of the untouched tensor, computed once

    for rule in rules:
        regex = re.compile(rule.name_pattern)
        dry = rule.dry_run or force_dry_run
        matches = [(n, t) for n, t in items if regex.search(n) and t.is_floating_point()]
        if not matches:
            warnings.append(f"normalize_weight_scales: rule {rule.name_pattern!r} matches no floating-point tensor; "
                            "nothing done for it")
            continue
        stds: dict[str, float] = {}
        unusable: dict[str, str] = {}
        for name, t in matches:
            if t.device.type == "meta":
                unusable[name] = "meta tensor (no data)"
                continue
            if name not in base_std:
                base_std[name] = tensor_std(t)
            s = base_std[name] * factors.get(name, 1.0)
            stds[name] = s
            if t.numel() < 2:
                unusable[name] = "fewer than 2 elements"
            elif not math.isfinite(s):
                unusable[name] = "non-finite std"
            elif s == 0.0:
                unusable[name] = "constant tensor (std 0)"
        usable = [stds[n] for n, _ in matches if n not in unusable]
        if len(usable) < MIN_MATCHES:
            warnings.append(
                f"normalize_weight_scales: rule {rule.name_pattern!r} has {len(usable)} usable matching tensor(s), "
                f"needs at least {MIN_MATCHES} for a median; nothing changed for it")
            for name, _ in matches:
                rows.append(ScaleReport(rule.name_pattern, name, stds.get(name, float("nan")), float("nan"),
                                        float("nan"), ACTION_SKIPPED, 1.0,
                                        unusable.get(name, f"rule has fewer than {MIN_MATCHES} usable matches")))
            continue
        median = lower_median(usable)
        lo, hi = 1.0 / rule.threshold, rule.threshold
        for name, _ in matches:
            if name in unusable:
                rows.append(ScaleReport(rule.name_pattern, name, stds.get(name, float("nan")), median,
                                        float("nan"), ACTION_SKIPPED, 1.0, unusable[name]))
                continue
            s = stds[name]
            ratio = s / median
            if lo <= ratio <= hi:
                rows.append(ScaleReport(rule.name_pattern, name, s, median, ratio, ACTION_OK))
            elif dry:
                rows.append(ScaleReport(rule.name_pattern, name, s, median, ratio, ACTION_DRY_RUN))
            else:
                scale = median / s
                factors[name] = factors.get(name, 1.0) * scale
                rows.append(ScaleReport(rule.name_pattern, name, s, median, ratio, ACTION_RESCALED, scale))
    for w in warnings:
        log.warning(w)
    return rows, warnings, {n: f for n, f in factors.items() if f != 1.0}


def scan_weight_scales(named_tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
                       rules: Any, *, dry_run: bool = False,
                       warnings: list[str] | None = None) -> list[ScaleReport]:
    """Pure scan: report rows for every tensor matched by every rule; changes nothing.

    `named_tensors`: (name, tensor) pairs, a name->tensor mapping, or a module (its
    named_parameters). `rules`: ScaleRule / config WeightScaleRule / mappings with
    name_pattern, threshold, dry_run. A row's action "rescaled" means "would be rescaled by
    `scale`" here (normalize_weight_scales applies it). `dry_run=True` treats every rule as a
    dry run. Warnings (rule matching nothing, fewer than 3 usable matches) are logged and,
    when `warnings` is a list, appended to it.
    """
    rows, warns, _ = scan_tensors(named_list(named_tensors), coerce_rules(rules), dry_run)
    if warnings is not None:
        warnings.extend(warns)
    return rows


def normalize_weight_scales(model_or_named_tensors: Any, rules: Any, *, dry_run: bool = False) -> WeightScaleResult:
    """Detect and (unless dry run) rescale outliers in place, under torch.no_grad().

    Accepts a torch module (its named_parameters(); buffers are not touched), a
    name->tensor mapping or (name, tensor) pairs. Run it at load time on the base weights,
    before adapters are attached. Deterministic: every rank gets the same result from the
    same weights, with no collective (see the module docstring).
    """
    items = named_list(model_or_named_tensors)
    rows, warns, factors = scan_tensors(items, coerce_rules(rules), dry_run)
    by_name = dict(items)
    with torch.no_grad():
        for name, factor in factors.items():
            rescale_(by_name[name], factor)
    for name, factor in factors.items():
        log.info("normalize_weight_scales: rescaled %s by %.6g", name, factor)
    return WeightScaleResult(rows=rows, warnings=warns, n_rescaled=len(factors), scales=dict(factors))


# --------------------------------------------------------------------------- display


def _fmt(x: float, spec: str) -> str:
    return "-" if not math.isfinite(x) else format(x, spec)


def render_table(result: WeightScaleResult | Sequence[ScaleReport], title: str | None = None):
    """A rich Table (tensor, std, ratio, action); outliers highlighted, one section per rule."""
    from rich.markup import escape
    from rich.table import Table

    rows = result.rows if isinstance(result, WeightScaleResult) else list(result)
    table = Table(title=title or "weight scales")
    table.add_column("tensor", overflow="fold")
    table.add_column("std", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("action")
    styles = {ACTION_OK: "", ACTION_RESCALED: "bold yellow", ACTION_DRY_RUN: "bold red", ACTION_SKIPPED: "dim"}
    current_rule = None
    for r in rows:
        if r.rule != current_rule:
            if current_rule is not None:
                table.add_section()
            median = f"median std {_fmt(r.median, '.4g')}" if math.isfinite(r.median) else "skipped"
            table.add_row(f"[bold]rule {escape(r.rule)}[/bold]", "", "", median, style="cyan")
            current_rule = r.rule
        action = r.action
        if r.action == ACTION_RESCALED:
            action = f"rescaled x{r.scale:.4g}"
        elif r.action == ACTION_SKIPPED and r.note:
            action = f"skipped ({escape(r.note)})"
        table.add_row(escape(r.name), _fmt(r.std, ".4g"), _fmt(r.ratio, ".3f"), action, style=styles.get(r.action, ""))
    if isinstance(result, WeightScaleResult):
        n_out = len(result.outliers)
        caption = f"{n_out} outlier(s), {result.n_rescaled} tensor(s) rescaled"
        if result.warnings:
            caption += f"; {len(result.warnings)} warning(s)"
        table.caption = caption
    return table


__all__ = [
    "ACTIONS", "ACTION_DRY_RUN", "ACTION_OK", "ACTION_RESCALED", "ACTION_SKIPPED", "MIN_MATCHES",
    "ScaleReport", "ScaleRule", "WeightScaleResult", "lower_median", "normalize_weight_scales",
    "render_table", "scan_weight_scales", "tensor_std",
]
