"""`archtune check` end to end: JSON shape, human output, exit codes, --nproc, --probe wiring,
and that it never needs (or loads) the weights."""
from __future__ import annotations

import json
import types

import pytest

from archtune.errors import Problem
from tests.e2e.conftest import run_cli, write_config

DESIGN_KEYS = {  # every one of these must be in `settings` for an adapter + FSDP + checkpointing config
    "fsdp_config.fsdp_transformer_layer_cls_to_wrap", "lora_target_modules", "lora_target_parameters",
    "freeze_mm_modules", "ddp_find_unused_parameters", "gradient_checkpointing_kwargs.use_reentrant",
    "use_cache", "experts_implementation", "sample_packing_drop_attention_mask", "world_size",
}
SEED_FSDP2 = {
    "fsdp": ["full_shard", "auto_wrap"],
    "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                    "fsdp_transformer_layer_cls_to_wrap": "Gemma4TextDecoderLayer"},
}


def config(tmp_path, name="check.yaml", **keys):
    base = {"base_model": "tiny:gemma4-moe", "datasets": [{"path": str(tmp_path / "data.jsonl")}]}
    return write_config(tmp_path / name, **{**base, **keys})


def check_json(capsys, *args) -> tuple[int, dict]:
    code, out, err = run_cli(capsys, "check", *args, "--json")
    return code, json.loads(out)  # the whole of stdout is one JSON object


def test_json_has_the_design_shape_and_every_key(tmp_path, capsys):
    cfg = config(tmp_path, adapter="lora", lora_target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                 gradient_checkpointing=True, **SEED_FSDP2)
    code, data = check_json(capsys, cfg, "--nproc", "2")
    assert code == 0, data["errors"]
    # DESIGN.md's keys, in order, then what `check` adds: the world and what each node runs.
    assert list(data) == ["family", "model_type", "world_size", "settings", "info", "warnings", "errors", "launch"]
    assert (data["family"], data["model_type"], data["world_size"]) == ("gemma4", "gemma4", 2)
    assert DESIGN_KEYS <= set(data["settings"])
    assert all(set(d) == {"value", "source", "reason"} and d["source"] in {"user", "default", "family", "auto"}
               for d in data["settings"].values())
    s = data["settings"]
    assert s["gradient_checkpointing_kwargs.use_reentrant"] == {
        "value": False, "source": "family", "reason": s["gradient_checkpointing_kwargs.use_reentrant"]["reason"]}
    assert s["fsdp_config.fsdp_transformer_layer_cls_to_wrap"]["value"] == "Gemma4TextDecoderLayer"
    assert s["use_cache"]["value"] is False and s["use_cache"]["source"] == "auto"
    assert s["freeze_mm_modules"]["value"] is True and s["freeze_mm_modules"]["source"] == "family"
    assert data["warnings"] == [] and data["errors"] == []
    assert "gradient_checkpointing_kwargs" not in s and "fsdp_config" not in s  # only dotted leaves


def test_human_output_shows_family_and_auto_settings_with_reasons(tmp_path, capsys):
    cfg = config(tmp_path, adapter="lora", lora_target_modules=["q_proj", "v_proj"], gradient_checkpointing=True)
    code, out, err = run_cli(capsys, "check", cfg)
    assert code == 0, err
    assert "gemma4" in out and "check passed" in out
    for key in ("freeze_mm_modules", "use_reentrant", "lora_target_modules", "use_cache"):
        assert key in out
    assert "family" in out and "auto" in out and "mismatch" in out  # sources and reasons (wrapped at 80 columns)
    assert "sequence_len" not in out and "learning_rate" not in out  # user/default settings are not listed
    # The MoE warning comes after the table, with the YAML to add.
    assert out.index("warning") > out.index("freeze_mm_modules")
    assert "- experts.gate_up_proj" in out


FSDP1_QLORA = {  # FSDP1 with a 4-bit base: a refusal on every family
    "adapter": "qlora", "load_in_4bit": True, "fsdp": ["full_shard", "auto_wrap"],
    "fsdp_config": {"fsdp_version": 1, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                    "fsdp_transformer_layer_cls_to_wrap": "Gemma4TextDecoderLayer"},
}


def test_errors_exit_2_in_both_outputs(tmp_path, capsys):
    cfg = config(tmp_path, **FSDP1_QLORA, gradient_checkpointing=True,
                 gradient_checkpointing_kwargs={"use_reentrant": True})
    code, data = check_json(capsys, cfg, "--nproc", "2")
    assert code == 2
    assert {e["key"] for e in data["errors"]} == {"fsdp_config.fsdp_version", "gradient_checkpointing_kwargs.use_reentrant"}
    assert all(set(e) == {"key", "message", "fix"} and e["fix"] for e in data["errors"])
    code, out, err = run_cli(capsys, "check", cfg, "--nproc", "2")
    assert code == 2
    assert "error fsdp_config.fsdp_version" in out and "FSDP1 with a quantized base" in out and "fix:" in out
    assert "check failed: 2 errors" in out


def test_overrides_apply(tmp_path, capsys):
    cfg = config(tmp_path, **{**FSDP1_QLORA, "fsdp_config": {**FSDP1_QLORA["fsdp_config"], "fsdp_version": 2}})
    code, data = check_json(capsys, cfg, "--nproc", "2")
    assert code == 0, data["errors"]
    code, data = check_json(capsys, cfg, "--nproc", "2", "fsdp_config.fsdp_version=1")
    assert code == 2 and data["errors"][0]["key"] == "fsdp_config.fsdp_version"


def test_nproc_resolves_ddp_decisions(tmp_path, capsys):
    cfg = config(tmp_path, adapter="lora")
    code, one = check_json(capsys, cfg)
    code2, two = check_json(capsys, cfg, "--nproc", "2")
    assert code == code2 == 0
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["settings"]["ddp_find_unused_parameters"]["value"] is False
    assert two["settings"]["ddp_find_unused_parameters"] == {
        "value": True, "source": "family", "reason": two["settings"]["ddp_find_unused_parameters"]["reason"]}
    code, out, err = run_cli(capsys, "check", cfg, "--nproc", "0")
    assert code == 2 and "--nproc" in err


def test_nnodes_shows_what_each_node_runs_and_the_global_batch_of_that_world(tmp_path, capsys):
    import shlex

    import typer

    from archtune.cli.commands import app
    from archtune.train.launch import torchrun_argv

    cfg = config(tmp_path, adapter="lora", micro_batch_size=2, gradient_accumulation_steps=3)
    code, one = check_json(capsys, cfg)
    code4, four = check_json(capsys, cfg, "--nproc", "2", "--nnodes", "2", "--master-addr", "10.0.0.1", "lora_r=4")
    assert code == code4 == 0, four["errors"]
    # The world changes what it must: world size, global batch, DDP's setting; the per-device batch stays.
    assert (one["world_size"], four["world_size"]) == (1, 4)
    assert (one["settings"]["global_batch_size"]["value"], four["settings"]["global_batch_size"]["value"]) == (6, 24)
    assert one["settings"]["micro_batch_size"] == four["settings"]["micro_batch_size"]
    assert (one["launch"]["strategy"], four["launch"]["strategy"]) == ("single", "ddp")
    assert one["settings"]["ddp_find_unused_parameters"]["value"] != four["settings"]["ddp_find_unused_parameters"][
        "value"]
    launch = four["launch"]
    assert {k: launch[k] for k in ("nproc_per_node", "nnodes", "world_size", "micro_batch_size",
                                   "gradient_accumulation_steps", "global_batch_size")} == {
        "nproc_per_node": 2, "nnodes": 2, "world_size": 4, "micro_batch_size": 2, "gradient_accumulation_steps": 3,
        "global_batch_size": 24}
    nodes = launch["nodes"]
    assert [(n["node_rank"], n["global_ranks"], n["prepares_data"], n["writes_outputs"]) for n in nodes] == [
        (0, [0, 1], 0, 0), (1, [2, 3], 2, None)]
    assert nodes[1]["command"] == (f"archtune train {cfg} --nproc 2 --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 "
                                   "--master-port 29500 lora_r=4")
    assert nodes[1]["torchrun"] == (f"torchrun --nproc-per-node 2 --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 "
                                    f"--master-port 29500 -m archtune train {cfg} lora_r=4")
    # Each printed archtune line, parsed by `archtune train` itself, starts exactly its torchrun line.
    train = typer.main.get_command(app).commands["train"]
    for node in nodes:
        params = train.make_context("train", shlex.split(node["command"])[2:]).params
        argv = torchrun_argv(params["config"], params["overrides"], nproc=params["nproc"], nnodes=params["nnodes"],
                             node_rank=params["node_rank"], master_addr=params["master_addr"],
                             master_port=params["master_port"])
        assert shlex.join(["torchrun", *argv]) == node["torchrun"]

    code, out, err = run_cli(capsys, "check", cfg, "--nproc", "2", "--nnodes", "2")
    text = " ".join(out.split())
    assert code == 0, err
    assert "world: 4 processes (2 per node x 2 nodes), ddp; global batch 24 rows per optimizer step" in text
    assert "node 0: global ranks 0-1; rank 0 prepares the data into this node's cache; rank 0 writes the outputs" in text
    assert "node 1: global ranks 2-3; rank 2 prepares the data into this node's cache" in text
    assert f"archtune train {cfg} --nproc 2 --nnodes 2 --node-rank 1 --master-addr NODE0_ADDR --master-port 29500" in text
    code, out, err = run_cli(capsys, "check", cfg, "--nnodes", "0")
    assert code == 2 and "--nnodes" in err


def test_check_needs_only_config_json(tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "model"
    code, _, err = run_cli(capsys, "init-tiny", "gemma4-e2b", model_dir)
    assert code == 0, err
    (model_dir / "model.safetensors").unlink()

    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("archtune check loaded weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", no_weights)
    cfg = config(tmp_path, base_model=str(model_dir), adapter="lora", fsdp=["full_shard", "auto_wrap"],
                 fsdp_config={"fsdp_transformer_layer_cls_to_wrap": "Gemma4AudioLayer"})
    code, data = check_json(capsys, cfg, "--nproc", "2")
    assert code == 0, data["errors"]  # the E2B shape has an audio tower: the class exists
    assert data["family"] == "gemma4"
    assert not list(model_dir.glob("*.safetensors"))


def test_probe_flag_runs_the_consistency_probe(tmp_path, capsys, monkeypatch):
    calls = []

    def run_probe(cfg, plan, console):
        calls.append((cfg.base_model, plan.family.name, console is not None))
        return [Problem("probe", "training forward differs from inference", "see FINDINGS.md")]

    fake = types.ModuleType("archtune.diagnostics.consistency")
    fake.run_probe = run_probe
    monkeypatch.setitem(__import__("sys").modules, "archtune.diagnostics.consistency", fake)
    cfg = config(tmp_path, adapter="lora")
    code, data = check_json(capsys, cfg, "--probe")
    assert calls == [("tiny:gemma4-moe", "gemma4", True)]
    assert code == 2 and data["errors"][-1]["key"] == "probe"
    code, data = check_json(capsys, cfg)  # no --probe: not called
    assert code == 0 and len(calls) == 1


def test_unknown_tiny_model_is_a_user_error(tmp_path, capsys):
    code, out, err = run_cli(capsys, "check", config(tmp_path, base_model="tiny:nope"))
    assert code == 2 and "tiny:" in err


@pytest.mark.parametrize("name", ["gemma3", "qwen3_5-moe", "llama"])
def test_every_tiny_model_checks_clean(tmp_path, capsys, name):
    code, data = check_json(capsys, config(tmp_path, base_model=f"tiny:{name}", adapter="lora"))
    assert code == 0 and data["errors"] == []
