"""Diagnostics: the training-vs-inference consistency probe, the initial-loss check, and the
weight-scale scan of a checkpoint directory (`archtune scan-weights`), and whether the installed
libraries are the verified ones (`environment`)."""
from archtune.diagnostics.scan_weights import parse_rule_arg, scan_model_dir
from archtune.models.weight_scales import (
    ScaleReport,
    ScaleRule,
    WeightScaleResult,
    normalize_weight_scales,
    render_table,
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
