"""The example configs (one per real model of the reference) pass `archtune check` on their tiny
counterparts, with the family's decisions visible in `--json`, as for 1 and 2 processes.

Each example names a hub model (google/gemma-4-26B-A4B, ...); CI has no hub, so `base_model` is
overridden with the embedded tiny model of the same shape. FSDP examples plan the same FSDP
settings for 1 and 2 processes (the plan does not depend on the process count there); DDP
decisions (`ddp_find_unused_parameters`) only exist for 2 or more processes, so both are tested.
"""
from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.e2e.conftest import REPO, run_cli

EXAMPLES = REPO / "examples"
NOT_MODEL_EXAMPLES = {"quickstart.yaml", "quickstart-lora.yaml", "quickstart-vision.yaml",
                      "quickstart-audio.yaml"}  # the CPU quickstarts have their own tests
WRAP = "fsdp_config.fsdp_transformer_layer_cls_to_wrap"
REENTRANT = "gradient_checkpointing_kwargs.use_reentrant"
GEMMA4_REGEX = r"model.language_model.layers.[\d]+.(_checkpoint_wrapped_module.)?(mlp|self_attn).(up|down|gate|q|k|v|o)_proj"
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]

# example -> (tiny counterpart, hub model, family, {setting: (value, source)} for any process count,
#             uses FSDP)
CASES: dict[str, tuple[str, str, str, dict, bool]] = {
    "gemma4-26b-a4b-moe.yaml": ("gemma4-moe", "google/gemma-4-26B-A4B", "gemma4", {
        WRAP: ("Gemma4TextDecoderLayer", "user"),
        "fsdp_config.fsdp_version": (2, "user"),
        "fsdp_config.fsdp_auto_wrap_policy": ("TRANSFORMER_BASED_WRAP", "user"),
        REENTRANT: (False, "user"),
        "lora_target_modules": (GEMMA4_REGEX, "user"),
        "lora_target_parameters": (EXPERTS, "user"),
        "lora_dropout": (0.0, "user"),
        "plugins": (["archtune.plugins.KernelsPlugin"], "auto"),
        "use_kernels": (True, "user"),
        "use_scattermoe": (True, "user"),
        "experts_implementation": ("scattermoe", "user"),
        "freeze_mm_modules": (True, "user"),
        "use_cache": (False, "auto"),
        "bf16": (True, "user"),
    }, True),
    "gemma4-31b.yaml": ("gemma4-dense", "google/gemma-4-31B", "gemma4", {
        "adapter": ("qlora", "user"),
        "load_in_4bit": (True, "user"),
        "lora_target_modules": (GEMMA4_REGEX, "family"),
        "freeze_mm_modules": (True, "family"),
        REENTRANT: (False, "user"),
        "use_cache": (False, "auto"),
    }, False),
    "gemma4-e2b.yaml": ("gemma4-e2b", "google/gemma-4-E2B", "gemma4", {
        # The name list is confined to the language model (the towers have q_proj/... too).
        "lora_target_modules": (r"model\.language_model\.(?:.*\.)?(?:q_proj|k_proj|v_proj|o_proj)", "auto"),
        "freeze_mm_modules": (True, "family"),
        "sample_packing_drop_attention_mask": (True, "family"),
        REENTRANT: (False, "user"),
    }, False),
    "gemma4-e4b.yaml": ("gemma4-e2b", "google/gemma-4-E4B", "gemma4", {
        "lora_target_modules": (GEMMA4_REGEX, "user"),
        "freeze_mm_modules": (True, "user"),
        REENTRANT: (False, "user"),
    }, False),
    "gemma3-4b.yaml": ("gemma3", "google/gemma-3-4b-it", "gemma3", {
        "lora_target_modules": (None, "family"),  # the family regex, compared below
        "freeze_mm_modules": (True, "family"),
        "sample_packing": (True, "user"),
        "sample_packing_drop_attention_mask": (True, "family"),
        REENTRANT: (False, "user"),
    }, False),
    "qwen3_5-35b-a3b.yaml": ("qwen3_5-moe", "Qwen/Qwen3.5-35B-A3B", "qwen3_5_moe", {
        WRAP: ("Qwen3_5MoeDecoderLayer", "family"),
        # gate_proj/up_proj/down_proj resolved to the fused expert tensors
        "lora_target_parameters": (EXPERTS, "auto"),
        "lora_target_modules": (None, "user"),  # the family regex, compared below
        "normalize_weight_scales": ([{"name_pattern": r"linear_attn\.conv1d\.weight", "threshold": 1.3,
                                      "dry_run": False}], "user"),
        "freeze_mm_modules": (True, "family"),
        REENTRANT: (False, "user"),
    }, True),
}


def check_json(capsys, example: str, tiny: str, *args: str) -> dict:
    code, out, err = run_cli(capsys, "check", EXAMPLES / example, f"base_model=tiny:{tiny}", "--json", *args)
    data = json.loads(out)
    assert code == 0 and data["errors"] == [], (code, data["errors"], err)
    return data


def test_every_model_example_is_covered():
    found = {p.name for p in EXAMPLES.glob("*.yaml")} - NOT_MODEL_EXAMPLES
    assert found == set(CASES)


@pytest.mark.parametrize("example", sorted(CASES))
def test_example_loads_as_written_and_opens_with_its_launch_command(example):
    from archtune.config import load_config

    tiny, hub_model, family, _, fsdp = CASES[example]
    path = EXAMPLES / example
    cfg = load_config(path)  # the real hub id: validation needs no network
    assert cfg.base_model == hub_model
    for ds in [*cfg.datasets, *(cfg.test_datasets or [])]:
        assert (REPO / ds.path).is_file(), f"{example}: {ds.path} is not bundled"
    text = path.read_text()
    header = text[:text.index("\nbase_model:")]
    assert all(line.startswith("#") for line in header.splitlines()), "the file opens with its comment"
    launch = f"archtune train examples/{example}" + (" --nproc 2" if fsdp else "")
    assert launch in header and f"archtune check examples/{example}" in header
    assert "Needs:" in header and "GPU" in header


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("example", sorted(CASES))
def test_example_passes_check_on_its_tiny_counterpart(capsys, example, nproc):
    from archtune.families import get_family

    tiny, _, family, expected, fsdp = CASES[example]
    data = check_json(capsys, example, tiny, "--nproc", str(nproc))
    assert (data["family"], data["world_size"]) == (family, nproc)
    assert data["warnings"] == []
    settings = data["settings"]
    for key, (value, source) in expected.items():
        if key == WRAP and fsdp and nproc == 1:  # FSDP is off for one process
            continue
        assert settings[key]["source"] == source, (key, settings[key])
        if value is not None:
            assert settings[key]["value"] == value, (key, settings[key])
    fam = get_family(family)
    if settings["lora_target_modules"]["value"] != fam.lora_target_regex:  # a regex archtune derived
        assert settings["lora_target_modules"]["source"] == "auto"
    ddp = settings["ddp_find_unused_parameters"]
    if fsdp and nproc == 1:  # one process: nothing to shard, trains unsharded (an info line says so)
        assert (settings["fsdp"]["value"], settings["fsdp"]["source"]) == (None, "auto")
        assert any(line.startswith("fsdp: one process") for line in data["info"])
        assert (ddp["value"], ddp["source"]) == (False, "default")
    elif fsdp:
        assert settings["fsdp"]["value"] == ["full_shard", "auto_wrap"]
        assert settings[WRAP]["value"] == fam.decoder_layer_cls
        assert (ddp["value"], ddp["source"]) == (False, "default")  # FSDP: DDP's setting does not apply
    elif nproc == 1:
        assert (ddp["value"], ddp["source"]) == (False, "default")
    else:  # DDP: Gemma 3/4 search for unused (frozen tower) parameters
        assert (ddp["value"], ddp["source"]) == (True, "family")
        assert "Expected to have finished reduction" in ddp["reason"]
    if settings["adapter"]["value"] and "lora_target_parameters" not in expected:
        assert settings["lora_target_parameters"]["value"] is None  # a dense model: no experts


@pytest.mark.parametrize("example", ["gemma4-e2b.yaml", "gemma3-4b.yaml"])
def test_confined_or_default_targets_never_reach_a_tower(capsys, example):
    """The LoRA target the example ends up with matches language-model modules and no tower module."""
    from archtune.families import get_family
    from archtune.models.tiny import build_tiny_config
    from archtune.plan import model_structure

    tiny, _, family, _, _ = CASES[example]
    data = check_json(capsys, example, tiny)
    pattern = re.compile(data["settings"]["lora_target_modules"]["value"])
    fam = get_family(family)
    names = model_structure(build_tiny_config(tiny).to_dict(), fam.auto_class).module_names
    hit = [n for n in names if pattern.fullmatch(n)]
    assert hit and all(n.startswith(fam.language_model_prefix + ".") for n in hit)


@pytest.mark.parametrize("example", ["gemma4-26b-a4b-moe.yaml", "gemma4-e4b.yaml", "qwen3_5-35b-a3b.yaml"])
def test_spelled_out_targets_are_the_family_regex(example):
    """A regex written into an example is the family's default, so the two cannot drift apart."""
    from archtune.families import get_family

    _, _, family, _, _ = CASES[example]
    written = yaml.safe_load((EXAMPLES / example).read_text())["lora_target_modules"]
    assert written == get_family(family).lora_target_regex


def test_seed_fsdp2_block_is_verbatim_and_equals_the_family_default(capsys):
    """The 26B-A4B example carries the reference's FSDP2 block as written; without its wrap class,
    archtune picks the same class itself."""
    from tests.e2e.test_check_cli import SEED_FSDP2

    written = yaml.safe_load((EXAMPLES / "gemma4-26b-a4b-moe.yaml").read_text())
    assert {"fsdp": written["fsdp"], "fsdp_config": written["fsdp_config"]} == SEED_FSDP2
    data = check_json(capsys, "gemma4-26b-a4b-moe.yaml", "gemma4-moe", "--nproc", "2",
                      "fsdp_config.fsdp_transformer_layer_cls_to_wrap=null")
    assert data["settings"][WRAP] == {"value": "Gemma4TextDecoderLayer", "source": "family",
                                      "reason": data["settings"][WRAP]["reason"]}


def test_example_keys_a_family_refuses_are_really_checked(capsys):
    """The examples pass because their settings are right, not because check ignores them: the
    26B-A4B example with FSDP1 + QLoRA, or with a wrap class the model lacks, is refused."""
    code, out, _ = run_cli(capsys, "check", EXAMPLES / "gemma4-26b-a4b-moe.yaml", "base_model=tiny:gemma4-moe",
                           "--json", "--nproc", "2", "fsdp_config.fsdp_version=1", "adapter=qlora",
                           "load_in_4bit=true")
    assert code == 2 and "fsdp_config.fsdp_version" in {e["key"] for e in json.loads(out)["errors"]}
    code, out, _ = run_cli(capsys, "check", EXAMPLES / "gemma4-26b-a4b-moe.yaml", "base_model=tiny:gemma4-moe",
                           "--json", "--nproc", "2", "fsdp_config.fsdp_transformer_layer_cls_to_wrap=Gemma4AudioLayer")
    errors = json.loads(out)["errors"]
    assert code == 2 and [e["key"] for e in errors] == [WRAP] and "Gemma4TextDecoderLayer" in errors[0]["fix"]
