"""docs/model_architectures.md: committed == generated (what `archtune docs --check` verifies in
CI), every family, rule and patch is in it, every key fact of the reference
(seed/model_architectures.md) is in it, and every YAML block in it is a valid archtune config."""
from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from archtune.docs import DOCS_FILE, default_output, render_model_architectures, yaml_block
from archtune.families import all_families, get_family
from archtune.patches.packing import get_packing_patch
from archtune.plan.rules import GENERIC_RULES, family_rules
from tests.e2e.conftest import run_cli

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "docs" / DOCS_FILE

GEMMA4_REGEX = r"model.language_model.layers.[\d]+.(_checkpoint_wrapped_module.)?(mlp|self_attn).(up|down|gate|q|k|v|o)_proj"

# Literal strings of the reference that the generated docs must contain. The second column names
# the optional Family field (see archtune.docs.OPTIONAL_FAMILY_FIELDS) that carries the fact when
# no rule or family datum produces it yet: such a fact is required as soon as any family declares
# the field, and skipped (with the field named) until then.
SEED_FACTS: list[tuple[str, str | None]] = [
    # Gemma 4: architecture
    ("Gemma4ForConditionalGeneration", None),
    ("Gemma4TextModel", None),
    ("`gemma4`", None),
    ("model.vision_tower", None),
    ("model.audio_tower", None),
    ("google/gemma-4-26B-A4B", "models"),
    ("google/gemma-4-31B", "models"),
    ("google/gemma-4-E2B", "models"),
    ("google/gemma-4-E4B", "models"),
    ("text-only", None),
    # Gemma 4: required settings, as YAML
    ("freeze_mm_modules: true", None),
    ("gradient_checkpointing_kwargs:\n  use_reentrant: false", None),
    ("marked ready twice", None),
    (f"lora_target_modules: '{GEMMA4_REGEX}'", None),
    ("lora_target_linear: true", None),
    # Gemma 4: auto-detection and multi-GPU
    ("ddp_find_unused_parameters: true", None),
    ("activation_offloading: true", None),
    ("checkpoint wrappers", None),
    ("| DDP |", None),
    ("| DDP + activation offloading |", None),
    ("| FSDP1 + QLoRA |", None),
    ("| FSDP2 |", None),
    ("| FSDP2 + activation offloading |", None),
    ("dequantizing and sharding", None),
    ("Gemma4TextDecoderLayer", None),
    ("Gemma4DecoderLayer", "notes"),
    ("~26 GiB", "notes"),
    ("fsdp:\n  - full_shard\n  - auto_wrap\nfsdp_config:\n  fsdp_version: 2\n"
     "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n  fsdp_transformer_layer_cls_to_wrap: Gemma4TextDecoderLayer",
     None),
    # Gemma 4: MoE
    ("enable_moe_block", None),
    ("256 experts", "architecture_notes"),
    ("SparseMoeBlock", "architecture_notes"),
    ("lora_target_parameters:\n  - experts.gate_up_proj\n  - experts.down_proj", None),
    ("plugins:\n  - axolotl.integrations.kernels.KernelsPlugin\nuse_kernels: true\nuse_scattermoe: true\n"
     "experts_implementation: scattermoe", None),
    # Gemma 4: common issues
    ("mm_token_type_ids", None),
    ("unwrap_model", None),
    ("compute_loss", None),
    ("prediction_step", None),
    ("marked a variable ready twice", None),
    ("loss ~12", None),
    ("~0.5", None),
    ("Gemma4AudioLayer", None),
    ("Could not find", None),
    ("Gemma4ClippableLinear", None),
    # Gemma 4: E2B/E4B
    ("hidden_size_per_layer_input: 256", "architecture_notes"),
    ("attention_k_eq_v", "architecture_notes"),
    # Gemma 3
    ("Gemma3ForConditionalGeneration", None),
    ("google/gemma-3-", "models"),
    ("`sample_packing_drop_attention_mask: true` (family)", None),
    # Qwen 3.5 MoE
    ("Qwen/Qwen3.5-35B-A3B", "models"),
    ("DeltaNet", None),
    ("full attention", "architecture_notes"),
    ("8 active", "architecture_notes"),
    ("36-38", "architecture_notes"),
    ("normalize_weight_scales", None),
    ("name_pattern: 'linear_attn\\.conv1d\\.weight'\n    threshold: 1.3", "weight_scale_rules"),
    # General MoE notes
    ("AdamW", None),
    ("dry_run: true", None),
    ("experts_implementation: scattermoe", None),
    ("KernelsPlugin", None),
    # What archtune adds
    ("13.5 MB adapter", None),
    ("--probe", None),
    ("ln(vocab", None),
    ("archtune scan-weights", None),
]


@pytest.fixture(scope="module")
def rendered() -> str:
    return render_model_architectures()


def flat(text: str) -> str:
    return " ".join(text.split())


def test_committed_docs_equal_the_render(rendered):
    assert COMMITTED.is_file(), "docs/model_architectures.md is missing: run `archtune docs`"
    assert COMMITTED.read_text(encoding="utf-8") == rendered, (
        "docs/model_architectures.md is out of date: run `archtune docs` and commit it")


def test_default_output_is_the_checkout_docs_file():
    assert default_output() == COMMITTED


def test_header_says_generated_and_not_to_edit(rendered):
    head = rendered.split("\n# ", 1)[0]
    assert "Generated by `archtune docs`" in head and "Do not edit by hand" in head


def test_every_family_rule_patch_and_tiny_model_appears(rendered):
    text = flat(rendered)
    for fam in all_families():
        assert f"Family `{fam.name}`" in text
        for t in fam.model_types:
            assert f"`{t}`" in text
        for rule in family_rules(fam):
            assert f"**{rule.name}**: {flat(rule.doc)}" in text, (fam.name, rule.name)
        for name in fam.patches:
            assert flat(get_packing_patch(name).doc) in text, (fam.name, name)
        for tiny in fam.tiny_models:
            assert f"`tiny:{tiny.name}`" in text and flat(tiny.description) in text
        for value in (fam.decoder_layer_cls, fam.lora_target_regex, fam.auto_class, *fam.mm_module_prefixes,
                      *fam.expert_param_names, *fam.lora_target_redirects):
            if value:
                assert value in rendered, (fam.name, value)
    for rule in GENERIC_RULES:
        assert f"**{rule.name}**: {flat(rule.doc)}" in text, rule.name


@pytest.mark.parametrize("fact,field", SEED_FACTS, ids=[f[0][:40] for f in SEED_FACTS])
def test_every_key_fact_of_the_reference_appears(rendered, fact, field):
    if field is not None and fact not in rendered and not any(getattr(f, field, None) for f in all_families()):
        pytest.skip(f"needs the family field `{field}` (no family declares it yet)")
    assert fact in rendered


def test_family_sections_carry_their_own_decisions(rendered):
    """Facts land in the right family's section (the multi-GPU table is per family)."""
    sections = {m.group(1): m.group(0) for m in re.finditer(r"Family `(\w+)`.*?(?=\n## |\Z)", rendered, re.S)}
    assert set(sections) == {f.name for f in all_families()}
    g4, g3, qwen, generic = sections["gemma4"], sections["gemma3"], sections["qwen3_5_moe"], sections["generic"]
    fsdp1 = lambda s: next(line for line in s.splitlines() if line.startswith("| FSDP1 + QLoRA |"))  # noqa: E731
    # FSDP1 is refused for every family; Gemma 4 with a quantized base names its own reason.
    assert all("**refused**" in fsdp1(s) for s in (g4, g3, generic))
    assert "dequantizing" in fsdp1(g4) and "dequantizing" not in fsdp1(g3) + fsdp1(generic)
    ddp = lambda s: next(line for line in s.splitlines() if line.startswith("| DDP |"))  # noqa: E731
    assert "`ddp_find_unused_parameters: true` (family)" in ddp(g4)
    assert "`ddp_find_unused_parameters: true` (family)" in ddp(g3)
    assert "`ddp_find_unused_parameters: false` (default)" in ddp(qwen)
    assert "fsdp_transformer_layer_cls_to_wrap: Gemma4TextDecoderLayer" in g4
    assert "fsdp_transformer_layer_cls_to_wrap: Qwen3_5MoeDecoderLayer" in qwen
    assert "Gemma4ClippableLinear" in g4 and "Gemma4ClippableLinear" not in g3
    for section in (g4, g3):  # Gemma 3/4 drop the attention mask of packed rows by family rule
        assert "**Sample packing**: `sample_packing_drop_attention_mask: true` (family)" in section
    assert "lora_target_parameters:\n  - experts.gate_up_proj" in qwen and "experts.gate_up_proj" not in g3


def _yaml_blocks(text: str) -> list[str]:
    # Blocks nested in a list item are indented: dedent them.
    return [textwrap.dedent(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def test_every_yaml_block_is_a_valid_config_fragment(rendered):
    """Each snippet, added to a minimal config, loads with archtune's config loader."""
    from archtune.config.load import config_from_dict

    blocks = _yaml_blocks(rendered)
    assert len(blocks) >= 8
    for block in blocks:
        data = yaml.safe_load(block)
        assert isinstance(data, dict) and data, block
        base = {"base_model": "tiny:gemma4-moe", "datasets": [{"path": "data.jsonl"}], "adapter": "lora"}
        config_from_dict({**base, **data})  # raises UserError on any bad key or value


def test_yaml_block_round_trips_and_quotes_regexes():
    data = {"lora_target_modules": GEMMA4_REGEX, "fsdp": ["full_shard", "auto_wrap"],
            "fsdp_config": {"fsdp_version": 2, "x": None, "flag": False, "word": "true", "q": "it's"},
            "normalize_weight_scales": [{"name_pattern": r"linear_attn\.conv1d\.weight", "threshold": 1.3}]}
    text = yaml_block(data)
    assert yaml.safe_load(text) == data
    assert f"lora_target_modules: '{GEMMA4_REGEX}'" in text
    assert "  - name_pattern: 'linear_attn\\.conv1d\\.weight'\n    threshold: 1.3" in text


def test_optional_family_fields_drop_in():
    """The per-family fields the docs read when a family declares them (OPTIONAL_FAMILY_FIELDS)."""
    fam = copy.copy(get_family("qwen3_5_moe"))
    fam.models = {"Qwen/Qwen3.5-35B-A3B": "MoE"}
    fam.architecture_notes = ("Hybrid: Gated DeltaNet linear attention (30 layers) and full attention (10 layers)",)
    fam.notes = ("A practical note",)
    fam.known_issues = (("Loss 0 with packing", "state leaks across documents", "the packing patch"),)
    fam.weight_scale_rules = ({"name_pattern": r"linear_attn\.conv1d\.weight", "threshold": 1.3},)
    text = render_model_architectures([fam])
    assert "**Models**: `Qwen/Qwen3.5-35B-A3B` (MoE)" in text
    assert "- Hybrid: Gated DeltaNet linear attention (30 layers) and full attention (10 layers)." in text
    assert "### Notes\n\n- A practical note." in text
    assert "| Loss 0 with packing | state leaks across documents | the packing patch |" in text
    assert "normalize_weight_scales:\n  - name_pattern: 'linear_attn\\.conv1d\\.weight'\n    threshold: 1.3" in text


def test_docs_check_exits_2_on_an_altered_copy_and_docs_rewrites_it(tmp_path, capsys, rendered):
    copy_path = tmp_path / DOCS_FILE
    shutil.copy(COMMITTED, copy_path)
    code, out, err = run_cli(capsys, "docs", "--check", "--out", copy_path)
    assert code == 0 and "up to date" in out
    copy_path.write_text(rendered.replace("Gemma4TextDecoderLayer", "Gemma4DecoderLayer", 1))
    code, out, err = run_cli(capsys, "docs", "--check", "--out", copy_path)
    assert code == 2
    assert "out of date" in err and "run `archtune docs`" in err
    assert "-" in err and "Gemma4DecoderLayer" in err  # the diff is shown
    code, out, err = run_cli(capsys, "docs", "--out", copy_path)
    assert code == 0 and copy_path.read_text() == rendered
    code, out, err = run_cli(capsys, "docs", "--check", "--out", tmp_path / "missing.md")
    assert code == 2 and "does not exist" in err


def test_archtune_docs_check_in_a_fresh_process_with_another_hash_seed():
    """What CI runs; a different PYTHONHASHSEED must not change the output (no set order leaks)."""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.run([sys.executable, "-m", "archtune", "docs", "--check"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
