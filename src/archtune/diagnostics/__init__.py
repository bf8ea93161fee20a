"""Diagnostics that inspect (and optionally repair) model weights."""
from archtune.diagnostics.weight_scales import (
    ScaleReport,
    ScaleRule,
    WeightScaleResult,
    normalize_weight_scales,
    parse_rule_arg,
    render_table,
    scan_model_dir,
    scan_weight_scales,
)

__all__ = [
    "ScaleReport",
    "ScaleRule",
    "WeightScaleResult",
    "normalize_weight_scales",
    "parse_rule_arg",
    "render_table",
    "scan_model_dir",
    "scan_weight_scales",
]
