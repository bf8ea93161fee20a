"""DDP, FSDP2, activation offloading on 2 gloo processes (torchrun via `archtune train --nproc 2`)."""
from __future__ import annotations

import os

import pytest

from tests.dist.conftest import REPO, max_rel_diff

# Tiny gemma4-moe, towers trainable, full fine-tune: text-only batches never reach the towers.
TOWERS = {"freeze_mm_modules": False}
LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8}
FSDP = {"fsdp": ["full_shard", "auto_wrap"]}


def _ok(run):
    assert run.rc == 0, run.stderr[-4000:]
    return run


# ----------------------------------------------------------------------------- launch

def test_torchrun_arguments_pass_multi_node_flags_through():
    from archtune.train.launch import torchrun_argv

    argv = torchrun_argv("c.yaml", ["lr=1"], nproc=4, nnodes=2, node_rank=1, master_addr="10.0.0.1",
                         master_port=29400)
    assert argv == ["--nproc-per-node", "4", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                    "--master-port", "29400", "-m", "archtune", "train", "c.yaml", "lr=1"]
    from archtune.errors import UserError

    with pytest.raises(UserError, match="master-addr"):
        torchrun_argv("c.yaml", [], nproc=2, nnodes=2, node_rank=0)


# ----------------------------------------------------------------------------- DDP

def test_ddp_with_trainable_towers_trains_because_the_plan_turns_find_unused_on(train_run):
    run = _ok(train_run("ddp_full", **TOWERS))
    s = run.summary
    assert s["world_size"] == 2 and s["strategy"] == "ddp" and s["steps"] == 4
    assert s["ddp_find_unused_parameters"] is True
    assert s["eval_loss_final"] < s["eval_loss_initial"]
    # Rank 0 alone prints and writes outputs.
    assert run.stdout.count("training finished") == 1
    assert (run.out / "loss.png").is_file() and (run.out / "model.safetensors").is_file()


def test_ddp_without_the_family_rule_fails_the_way_users_report(train_run):
    run = train_run("ddp_full_no_find_unused", ddp_find_unused_parameters=False, **TOWERS)
    assert run.rc != 0
    assert "Expected to have finished reduction" in run.stderr
    assert "ddp_find_unused_parameters" in run.stderr


def test_ddp_ranks_hold_identical_parameters(train_run):
    run = _ok(train_run("ddp_full", **TOWERS))
    rank0, rank1 = run.rank_states()
    assert rank0 and set(rank0) == set(rank1)
    assert max_rel_diff(rank0, rank1) == 0.0


def test_ddp_loss_curve_equals_one_process_with_the_same_global_batch(train_run):
    ddp = _ok(train_run("ddp_full", **TOWERS)).summary
    single = _ok(train_run("single_full", nproc=1, micro_batch_size=4, **TOWERS)).summary
    assert single["world_size"] == 1 and len(ddp["train_losses"]) == len(single["train_losses"]) == 4
    assert ddp["train_losses"] == pytest.approx(single["train_losses"], rel=1e-4)
    assert ddp["train_tokens"] == single["train_tokens"]  # counted over both processes


def test_ddp_with_activation_offloading_trains_with_find_unused_off(train_run):
    run = _ok(train_run("ddp_lora_offload", activation_offloading=True, **LORA))
    s = run.summary
    assert s["strategy"] == "ddp+offload" and s["ddp_find_unused_parameters"] is False
    # Checkpointed, offloaded layers compute the same numbers as plain ones.
    plain = _ok(train_run("ddp_lora", **LORA)).summary
    assert s["train_losses"] == pytest.approx(plain["train_losses"], rel=1e-5)
    rank0, rank1 = run.rank_states()
    assert max_rel_diff(rank0, rank1) == 0.0


# ----------------------------------------------------------------------------- FSDP2

@pytest.mark.parametrize("model", ["gemma4-moe", "qwen3_5-moe"])
def test_fsdp2_lora_equals_ddp(train_run, model):
    keys = {**LORA, "base_model": f"tiny:{model}"}
    fsdp = _ok(train_run(f"fsdp_lora_{model}", **FSDP, **keys))
    ddp = _ok(train_run(f"ddp_lora_{model}" if model != "gemma4-moe" else "ddp_lora", **keys))
    assert fsdp.summary["strategy"] == "fsdp2" and fsdp.summary["sharded_params"] > 0
    assert ddp.summary["sharded_params"] == 0
    assert fsdp.summary["train_losses"] == pytest.approx(ddp.summary["train_losses"], rel=1e-4)
    assert max_rel_diff(fsdp.weights(), ddp.weights()) < 1e-4


def test_fsdp2_with_gradient_accumulation_equals_ddp(train_run):
    # transformers >= 5.25 defers FSDP2's reduction over micro-batches through a config attribute
    # only its own load-time sharding sets; archtune's sharding must defer it too, and exactly.
    keys = {**LORA, "micro_batch_size": 1, "gradient_accumulation_steps": 2}
    fsdp = _ok(train_run("fsdp_lora_accumulated", **FSDP, **keys))
    ddp = _ok(train_run("ddp_lora_accumulated", **keys))
    assert fsdp.summary["strategy"] == "fsdp2" and fsdp.summary["steps"] == ddp.summary["steps"] == 4
    assert fsdp.summary["train_losses"] == pytest.approx(ddp.summary["train_losses"], rel=1e-4)
    assert max_rel_diff(fsdp.weights(), ddp.weights()) < 1e-4


@pytest.mark.parametrize("model", ["gemma4-moe", "qwen3_5-moe"])
def test_fsdp2_full_fine_tune_equals_ddp(train_run, model):
    keys = {**TOWERS, "base_model": f"tiny:{model}"}
    suffix = "" if model == "gemma4-moe" else f"_{model}"  # the gemma4 runs are shared with other tests
    fsdp = _ok(train_run(f"fsdp_full{suffix}", **FSDP, **keys))
    ddp = _ok(train_run(f"ddp_full{suffix}", **keys))
    assert fsdp.summary["sharded_params"] > 0
    # Final weights gathered once and written by rank 0, in the same layout as DDP's.
    assert max_rel_diff(fsdp.weights(), ddp.weights()) < 1e-4
    rank0, rank1 = fsdp.rank_states()
    assert max_rel_diff(rank0, rank1) == 0.0


def _killed_at(step: int) -> dict:
    """Every rank SIGKILLs itself right after optimizer step `step` (tests/e2e/kill_plugin.py)."""
    return {"plugins": ["tests.e2e.kill_plugin.KillPlugin"], "allow_external_plugins": True,
            "env": {"ARCHTUNE_TEST_KILL_AT": f"step:{step}",
                    "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}}


def test_fsdp2_killed_after_a_sharded_checkpoint_resumes_to_the_same_weights(train_run, tmp_path):
    out = tmp_path / "resumed"
    killed = train_run("fsdp_full_killed", output_dir=out, save_steps=2, **_killed_at(3), **FSDP, **TOWERS)
    assert killed.rc != 0, killed.stderr[-3000:]
    checkpoint = out / "checkpoint-2"
    # Sharded: torch.distributed.checkpoint directories, no full model file.
    assert (checkpoint / "model_dcp" / ".metadata").is_file() and (checkpoint / "optimizer_dcp" / ".metadata").is_file()
    assert not list(checkpoint.glob("*.safetensors")) and not (out / "train_summary.json").exists()
    assert not (out / "checkpoint-3").exists()
    resumed = _ok(train_run("fsdp_full_resumed", output_dir=out, save_steps=2, resume_from_checkpoint=True,
                            **FSDP, **TOWERS))
    assert resumed.summary["steps"] == 4 and resumed.summary["resumed_from"] == "checkpoint-2"
    straight = _ok(train_run("fsdp_full", **FSDP, **TOWERS))
    assert max_rel_diff(resumed.weights(), straight.weights()) < 1e-4


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_chunked_cross_entropy_equals_the_stock_loss_under_fsdp2_and_ddp(train_run, strategy):
    """Tiny gemma4-moe, full fine-tune: lm_head is tied to the embeddings (a root parameter FSDP2
    gathers) and final_logit_softcapping 30 is applied inside the chunked loss."""
    keys = {**TOWERS, **(FSDP if strategy == "fsdp2" else {})}
    stock = _ok(train_run("fsdp_full" if strategy == "fsdp2" else "ddp_full", **keys))
    chunked = _ok(train_run(f"{strategy}_full_chunked", chunked_cross_entropy=True,
                            chunked_cross_entropy_num_chunks=3, **keys))
    assert chunked.summary["chunked_cross_entropy"] is True and chunked.summary["world_size"] == 2
    assert chunked.summary["train_losses"] == pytest.approx(stock.summary["train_losses"], rel=1e-5)
    assert max_rel_diff(chunked.weights(), stock.weights()) < 1e-4


def test_ddp_killed_with_sigkill_resumes_to_the_same_weights(train_run, tmp_path):
    """DDP, 2 processes: SIGKILL after step 3, resume from checkpoint-2: within 1e-6 of the
    uninterrupted run (relative to each tensor's largest value)."""
    out = tmp_path / "ddp_resumed"
    killed = train_run("ddp_full_killed", output_dir=out, save_steps=2, **_killed_at(3), **TOWERS)
    assert killed.rc != 0, killed.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = _ok(train_run("ddp_full_resumed", output_dir=out, save_steps=2, resume_from_checkpoint=True, **TOWERS))
    assert resumed.summary["resumed_from"] == "checkpoint-2" and resumed.summary["steps"] == 4
    straight = _ok(train_run("ddp_full", **TOWERS))
    diff = max_rel_diff(resumed.weights(), straight.weights())
    print(f"DDP SIGKILL + resume vs uninterrupted: max relative difference {diff:.3g}")
    assert diff <= 1e-6


# ----------------------------------------------------------------------------- QLoRA, 4-bit experts

QLORA_4BIT_EXPERTS = {"adapter": "qlora", "load_in_4bit": True, "lora_r": 4, "lora_alpha": 8,
                      "lora_target_parameters": ["experts.gate_up_proj", "experts.down_proj"],
                      "sample_packing": True}


def test_qlora_with_4bit_experts_under_ddp_and_fsdp2_equals_one_process(train_run):
    """Packed rows; the experts' 4-bit codes and quantization state are frozen parameters: DDP
    broadcasts them once, FSDP2 shards them along the experts and gathers them per layer."""
    single = _ok(train_run("single_qlora4", nproc=1, micro_batch_size=4, **QLORA_4BIT_EXPERTS))
    ddp = _ok(train_run("ddp_qlora4", **QLORA_4BIT_EXPERTS))
    fsdp = _ok(train_run("fsdp_qlora4", **FSDP, **QLORA_4BIT_EXPERTS))
    assert fsdp.summary["strategy"] == "fsdp2" and fsdp.summary["sharded_params"] > 0
    for run in (single, ddp, fsdp):
        assert run.summary["quantize_moe_experts"] is True
        assert run.summary["model_bytes"] == single.summary["model_bytes"]
    for run in (ddp, fsdp):
        assert run.summary["train_losses"] == pytest.approx(single.summary["train_losses"], rel=1e-4)
        assert max_rel_diff(run.weights(), single.weights()) < 1e-4


# ----------------------------------------------------------------------------- preference (DPO)

PREFERENCE = {"rl": "dpo", "adapter": "lora", "lora_r": 4, "lora_alpha": 8,
              "datasets": [{"path": str(REPO / "examples/data/preference/train.jsonl"), "type": "chat_template.default"}],
              "test_datasets": [{"path": str(REPO / "examples/data/preference/test.jsonl"),
                                 "type": "chat_template.default"}]}


def test_ddp_dpo_with_lora_equals_one_process_and_keeps_ranks_identical(train_run):
    """DPO with LoRA on the tiny Gemma 4 MoE (towers frozen, reference = adapter disabled) on 2 gloo
    processes: the same losses as one process with the same global batch, identical ranks."""
    run = _ok(train_run("ddp_dpo_lora", **PREFERENCE))
    s = run.summary
    assert s["world_size"] == 2 and s["strategy"] == "ddp" and s["method"] == "dpo"
    assert s["reference_model"] == "adapter_disabled" and s["steps"] == 4
    assert s["eval_rewards/margins"] > s["eval_rewards/margins_initial"] == 0.0
    assert run.stdout.count("training finished") == 1
    rank0, rank1 = run.rank_states()
    assert rank0 and max_rel_diff(rank0, rank1) == 0.0
    single = _ok(train_run("single_dpo_lora", nproc=1, micro_batch_size=4, **PREFERENCE)).summary
    assert s["train_losses"] == pytest.approx(single["train_losses"], rel=1e-4)
    assert s["eval_rewards/margins"] == pytest.approx(single["eval_rewards/margins"], rel=1e-3)
