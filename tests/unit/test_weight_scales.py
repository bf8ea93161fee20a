"""normalize_weight_scales: numeric tests on synthetic tensors, real safetensors
checkpoints (tiny Llama, sharded and not) and a real tiny Qwen 3.5 MoE."""
from __future__ import annotations

import filecmp
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from archtune.diagnostics import (
    ScaleRule,
    WeightScaleResult,
    normalize_weight_scales,
    parse_rule_arg,
    render_table,
    scan_model_dir,
    scan_weight_scales,
)
from archtune.models.weight_scales import lower_median, tensor_std
from archtune.errors import UserError

REL = 1e-6
SEED_RULE = ScaleRule(r"linear_attn\.conv1d\.weight", 1.3)


def _std(t: torch.Tensor) -> float:
    return float(t.detach().to(torch.float64).std())


def _family(n: int = 7, numel: int = 4096, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.conv.weight": (torch.randn(numel // 16, 16, generator=g) * 0.02).to(dtype)
            for i in range(n)}


def _clone(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in d.items()}


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                     b.view(-1).view(torch.uint8))


def _rows_by_name(result: WeightScaleResult | list) -> dict[str, object]:
    rows = result.rows if isinstance(result, WeightScaleResult) else result
    return {r.name: r for r in rows}


# --------------------------------------------------------------------------- core numerics


def test_drift_up_and_down_flagged_and_rescaled_to_median():
    tensors = _family()
    tensors["layers.2.conv.weight"].mul_(3.0)
    tensors["layers.5.conv.weight"].mul_(1.0 / 3.0)
    before = _clone(tensors)
    others = [n for n in tensors if n not in ("layers.2.conv.weight", "layers.5.conv.weight")]
    median = lower_median([_std(before[n]) for n in tensors])

    result = normalize_weight_scales(tensors, [ScaleRule(r"conv\.weight$", 1.3)])

    rows = _rows_by_name(result)
    assert result.n_rescaled == 2 and result.warnings == []
    assert rows["layers.2.conv.weight"].action == "rescaled" and rows["layers.2.conv.weight"].ratio > 2.5
    assert rows["layers.5.conv.weight"].action == "rescaled" and rows["layers.5.conv.weight"].ratio < 0.4
    assert set(result.scales) == {"layers.2.conv.weight", "layers.5.conv.weight"}
    for name in ("layers.2.conv.weight", "layers.5.conv.weight"):
        assert rows[name].median == pytest.approx(median, rel=1e-12)
        assert abs(_std(tensors[name]) - median) / median < REL
        assert tensors[name].dtype == torch.float32
    for name in others:
        assert rows[name].action == "ok"
        assert 1 / 1.3 <= rows[name].ratio <= 1.3
        assert _bitwise_equal(tensors[name], before[name])


def test_scan_is_pure_and_matches_normalize():
    tensors = _family()
    tensors["layers.3.conv.weight"].mul_(3.0)
    before = _clone(tensors)
    warnings: list[str] = []
    rows = scan_weight_scales(list(tensors.items()), [ScaleRule(r"conv", 1.3)], warnings=warnings)
    assert warnings == []
    assert [r.action for r in rows].count("rescaled") == 1
    for name in tensors:
        assert _bitwise_equal(tensors[name], before[name])
    applied = normalize_weight_scales(tensors, [ScaleRule(r"conv", 1.3)])
    assert applied.rows == rows


def test_dry_run_flags_but_changes_nothing():
    @dataclass
    class ConfigLikeRule:  # what the config's WeightScaleRule looks like once it grows dry_run
        name_pattern: str
        threshold: float
        dry_run: bool = False

    for rule in (ScaleRule("conv", 1.3, dry_run=True), ConfigLikeRule("conv", 1.3, True),
                 {"name_pattern": "conv", "threshold": 1.3, "dry_run": True}):
        tensors = _family()
        tensors["layers.1.conv.weight"].mul_(3.0)
        tensors["layers.4.conv.weight"].mul_(1 / 3.0)
        before = _clone(tensors)
        result = normalize_weight_scales(tensors, [rule])
        rows = _rows_by_name(result)
        assert result.n_rescaled == 0 and result.scales == {}
        assert rows["layers.1.conv.weight"].action == "outlier (dry run)"
        assert rows["layers.4.conv.weight"].action == "outlier (dry run)"
        assert sum(r.outlier for r in result.rows) == 2
        for name in tensors:
            assert _bitwise_equal(tensors[name], before[name])

    # a rule object without a dry_run attribute (today's config schema) is not a dry run
    @dataclass
    class OldRule:
        name_pattern: str
        threshold: float

    tensors = _family()
    tensors["layers.1.conv.weight"].mul_(3.0)
    assert normalize_weight_scales(tensors, [OldRule("conv", 1.3)]).n_rescaled == 1
    # the call-level dry_run forces every rule into a dry run
    tensors = _family()
    tensors["layers.1.conv.weight"].mul_(3.0)
    before = _clone(tensors)
    result = normalize_weight_scales(tensors, [ScaleRule("conv", 1.3)], dry_run=True)
    assert result.n_rescaled == 0 and len(result.outliers) == 1
    assert all(_bitwise_equal(tensors[n], before[n]) for n in tensors)


def test_fewer_than_three_matches_warns_and_changes_nothing():
    tensors = _family(n=2)
    tensors["layers.1.conv.weight"].mul_(5.0)
    before = _clone(tensors)
    result = normalize_weight_scales(tensors, [ScaleRule("conv", 1.3)])
    assert result.n_rescaled == 0
    assert len(result.warnings) == 1 and "at least 3" in result.warnings[0]
    assert [r.action for r in result.rows] == ["skipped", "skipped"]
    assert all(_bitwise_equal(tensors[n], before[n]) for n in tensors)

    result = normalize_weight_scales(tensors, [ScaleRule(r"no_such_tensor", 1.3)])
    assert result.rows == [] and result.n_rescaled == 0
    assert len(result.warnings) == 1 and "matches no" in result.warnings[0]


def test_constant_and_integer_tensors_do_not_count():
    tensors = _family(n=3)
    tensors["layers.9.conv.weight"] = torch.ones(64, 16)  # std 0: skipped, not in the median
    tensors["layers.8.conv.weight"] = torch.arange(64)  # integer: ignored
    before = _clone(tensors)
    result = normalize_weight_scales(tensors, [ScaleRule("conv", 1.3)])
    rows = _rows_by_name(result)
    assert "layers.8.conv.weight" not in rows
    assert rows["layers.9.conv.weight"].action == "skipped" and "std 0" in rows["layers.9.conv.weight"].note
    assert [rows[f"layers.{i}.conv.weight"].action for i in range(3)] == ["ok"] * 3
    assert all(_bitwise_equal(tensors[n], before[n]) for n in tensors)


def test_even_count_uses_lower_median():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4096, generator=g, dtype=torch.float64)
    factors = [1.0, 1.1, 1.2, 5.0]
    tensors = {f"w{i}": base * k for i, k in enumerate(factors)}
    s = tensor_std(base)
    result = normalize_weight_scales(tensors, [ScaleRule("w", 1.3)])
    # sorted stds: s, 1.1s, 1.2s, 5s -> lower median = 1.1s (torch.median semantics)
    assert result.rows[0].median == pytest.approx(1.1 * s, rel=1e-12)
    assert float(torch.median(torch.tensor([tensor_std(base * k) for k in factors]))) == pytest.approx(1.1 * s)
    assert [r.action for r in result.rows] == ["ok", "ok", "ok", "rescaled"]
    assert abs(tensor_std(tensors["w3"]) - 1.1 * s) / (1.1 * s) < 1e-12


def test_tensor_std_matches_torch_and_is_chunk_independent(monkeypatch):
    import archtune.models.weight_scales as ws

    t = torch.randn(1000, 37, generator=torch.Generator().manual_seed(3))
    ref = float(t.to(torch.float64).std())
    assert ws.tensor_std(t) == pytest.approx(ref, rel=1e-12)
    monkeypatch.setattr(ws, "_CHUNK", 999)
    assert ws.tensor_std(t) == pytest.approx(ref, rel=1e-12)
    assert math.isnan(ws.tensor_std(torch.ones(1)))


def test_bf16_keeps_dtype():
    tensors = _family(dtype=torch.bfloat16)
    tensors["layers.0.conv.weight"].mul_(3.0)
    before = _clone(tensors)
    result = normalize_weight_scales(tensors, [ScaleRule("conv", 1.3)])
    assert result.n_rescaled == 1
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    median = result.rows[0].median
    assert abs(_std(tensors["layers.0.conv.weight"]) - median) / median < 1e-2  # bf16 rounding
    for n in list(tensors)[1:]:
        assert _bitwise_equal(tensors[n], before[n])


def test_deterministic():
    a, b = _family(seed=7), _family(seed=7)
    for d in (a, b):
        d["layers.6.conv.weight"].mul_(2.0)
    ra = normalize_weight_scales(a, [ScaleRule("conv", 1.3)])
    rb = normalize_weight_scales(b, [ScaleRule("conv", 1.3)])
    assert ra.rows == rb.rows and ra.scales == rb.scales
    assert all(_bitwise_equal(a[n], b[n]) for n in a)


def test_later_rule_sees_earlier_fix_and_aliases_count_once():
    tensors = _family(n=4)
    tensors["layers.0.conv.weight"].mul_(3.0)
    tensors["alias.conv.weight"] = tensors["layers.0.conv.weight"].detach()  # same storage (tied weight)
    rules = [ScaleRule("conv", 1.3), ScaleRule(r"conv\.weight", 1.3)]
    result = normalize_weight_scales(tensors, rules)
    assert result.n_rescaled == 1
    second = [r for r in result.rows if r.rule == r"conv\.weight"]
    assert len(second) == 4 and all(r.action == "ok" for r in second)
    assert "alias.conv.weight" not in _rows_by_name(result)


def test_module_parameters_under_no_grad():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(5)])
    with torch.no_grad():
        model[3].weight.mul_(4.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = normalize_weight_scales(model, [ScaleRule(r"\.weight$", 1.3)])
    assert result.n_rescaled == 1 and list(result.scales) == ["3.weight"]
    assert model[3].weight.requires_grad and model[3].weight.grad_fn is None
    assert abs(_std(model[3].weight) - result.rows[0].median) / result.rows[0].median < REL
    for n, p in model.named_parameters():
        if n != "3.weight":
            assert _bitwise_equal(p.detach(), before[n])


# --------------------------------------------------------------------------- rules and table


def test_parse_rule_arg():
    rule = parse_rule_arg(r"linear_attn\.conv1d\.weight=1.3")
    assert rule == ScaleRule(r"linear_attn\.conv1d\.weight", 1.3, False)
    assert parse_rule_arg("a(?=b)=2").name_pattern == "a(?=b)"  # threshold after the last '='
    for bad in ("no_threshold", "=1.3", "x=abc", "x=1", "x=0.5", "x=nan", "x=", "(unclosed=1.5"):
        with pytest.raises(UserError) as info:
            parse_rule_arg(bad)
        assert info.value.problems[0].key == "--rule"


def test_bad_rule_objects_raise_user_error():
    with pytest.raises(UserError) as info:
        normalize_weight_scales(_family(), [{"name_pattern": "x", "threshold": 1.0}])
    assert info.value.problems[0].key == "normalize_weight_scales[0].threshold"
    with pytest.raises(UserError):
        normalize_weight_scales(_family(), [ScaleRule("(", 1.5)])


def test_render_table():
    from rich.console import Console

    tensors = _family(n=4)
    tensors["layers.0.conv.weight"].mul_(3.0)
    rules = [ScaleRule("conv", 1.3), ScaleRule(r"layers\.[0-9]\.conv", 1.3, dry_run=True), ScaleRule("nothing", 2.0)]
    result = normalize_weight_scales(tensors, rules)
    table = render_table(result)
    assert [c.header for c in table.columns] == ["tensor", "std", "ratio", "action"]
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "layers.0.conv.weight" in text and "rescaled" in text and "1 tensor(s) rescaled" in text
    assert r"rule layers\.[0-9]\.conv" in text  # regex brackets are not taken as rich markup


# --------------------------------------------------------------------------- checkpoint directories


def _tiny_llama(tmp_path: Path, name: str, **save_kwargs):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(4.0)
    out = tmp_path / name
    model.save_pretrained(out, **save_kwargs)
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_fixed_llama(out: Path, original: dict[str, torch.Tensor], result: WeightScaleResult):
    from transformers import LlamaForCausalLM

    drifted = "model.layers.2.mlp.down_proj.weight"
    assert result.n_rescaled == 1 and list(result.scales) == [drifted]
    reloaded = LlamaForCausalLM.from_pretrained(out)
    state = reloaded.state_dict()
    median = result.rows[0].median
    assert abs(_std(state[drifted]) - median) / median < REL
    assert _std(original[drifted]) / median > 3
    for name, tensor in original.items():
        if name != drifted:
            assert _bitwise_equal(state[name], tensor), name


def test_scan_model_dir_fix_llama(tmp_path):
    src, original = _tiny_llama(tmp_path, "model")
    rules = [parse_rule_arg(r"mlp\.down_proj\.weight=1.3")]

    # scan only: reported as dry run, nothing written
    scanned = scan_model_dir(src, rules)
    assert scanned.n_rescaled == 0
    assert [r.action for r in scanned.rows].count("outlier (dry run)") == 1
    assert _rows_by_name(scanned)["model.layers.2.mlp.down_proj.weight"].outlier

    out = tmp_path / "fixed"
    result = scan_model_dir(src, rules, fix_out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    assert filecmp.cmp(src / "config.json", out / "config.json", shallow=False)
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
    _check_fixed_llama(out, original, result)

    # dry-run rule with --fix: output identical to the input
    out2 = tmp_path / "dry"
    dry = scan_model_dir(src, [ScaleRule(r"mlp\.down_proj\.weight", 1.3, dry_run=True)], fix_out_dir=out2)
    assert dry.n_rescaled == 0 and len(dry.outliers) == 1
    assert filecmp.cmp(src / "model.safetensors", out2 / "model.safetensors", shallow=False)

    # refuses a non-empty output directory and MODEL_DIR itself
    with pytest.raises(UserError) as info:
        scan_model_dir(src, rules, fix_out_dir=out)
    assert info.value.problems[0].key == "--fix"
    with pytest.raises(UserError):
        scan_model_dir(src, rules, fix_out_dir=src)
    with pytest.raises(UserError) as info:
        scan_model_dir(tmp_path / "missing", rules)
    assert info.value.problems[0].key == "MODEL_DIR"


def test_scan_model_dir_fix_sharded(tmp_path):
    src, original = _tiny_llama(tmp_path, "sharded", max_shard_size="60KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    out = tmp_path / "fixed"
    result = scan_model_dir(src, [parse_rule_arg(r"mlp\.down_proj\.weight=1.3")], fix_out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    assert filecmp.cmp(src / "model.safetensors.index.json", out / "model.safetensors.index.json", shallow=False)
    drifted_shard = index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    for shard in shards:
        same = filecmp.cmp(src / shard, out / shard, shallow=False)
        assert same == (shard != drifted_shard), shard
    _check_fixed_llama(out, original, result)


# --------------------------------------------------------------------------- Qwen 3.5 MoE


def _tiny_qwen3_5_moe(source: str):
    """archtune's embedded tiny:qwen3_5-moe ("embedded"), or a tiny config built here ("own")."""
    if source == "embedded":
        try:
            from archtune.models.tiny import build_tiny_model

            model, _ = build_tiny_model("qwen3_5-moe")
        except Exception as exc:  # another engineer's work; the "own" case still runs
            pytest.skip(f"tiny:qwen3_5-moe not available: {exc!r}")
        return model
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    config = Qwen3_5MoeTextConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_conv_kernel_dim=4, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen3_5MoeForCausalLM(config)


@pytest.mark.parametrize("source", ["embedded", "own"])
def test_qwen3_5_moe_deltanet_conv1d_drift(source):
    model = _tiny_qwen3_5_moe(source)
    conv_names = [n for n, _ in model.named_parameters() if "linear_attn.conv1d.weight" in n]
    assert len(conv_names) >= 3
    params = dict(model.named_parameters())

    # clean weights: nothing to do
    clean = normalize_weight_scales(model, [SEED_RULE])
    assert clean.n_rescaled == 0 and clean.warnings == []
    assert sorted(r.name for r in clean.rows) == sorted(conv_names)

    drifted = conv_names[-1]
    with torch.no_grad():
        params[drifted].mul_(2.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    result = normalize_weight_scales(model, [SEED_RULE])

    assert result.n_rescaled == 1 and list(result.scales) == [drifted]
    rows = _rows_by_name(result)
    assert rows[drifted].action == "rescaled" and rows[drifted].ratio > 1.3
    assert all(rows[n].action == "ok" for n in conv_names if n != drifted)
    median = rows[drifted].median
    assert abs(_std(params[drifted]) - median) / median < REL
    assert params[drifted].dtype == before[drifted].dtype
    for name, p in model.named_parameters():
        if name != drifted:
            assert _bitwise_equal(p.detach(), before[name]), name

    # the fixed model still runs
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert torch.isfinite(logits).all()
