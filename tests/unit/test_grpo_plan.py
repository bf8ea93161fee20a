"""The plan of `rl: grpo` (plan/grpo.py): TRL's defaults with reasons, Axolotl's readings of the
`trl:` keys, the refusals, and the GRPOConfig built from it (train/grpo.py) carrying every setting."""
from __future__ import annotations

import importlib.util

import pytest

from archtune.config import config_from_dict
from archtune.data.user_code import load_function
from archtune.errors import UserError
from archtune.plan import resolve
from archtune.train.grpo import GuardedReward, RewardFailed, grpo_arguments
from archtune.train.recipe import training_arguments
from tests.unit.test_plan_rules import decision, error_keys, model_config

REWARDS = {"reward_funcs": ["rewards.digits"]}


def grpo_plan(world_size: int = 1, trl: dict | None = None, datasets=None, **keys):
    cfg = config_from_dict({"base_model": "tiny:llama", "datasets": datasets or [{"path": "data.jsonl"}],
                            "rl": "grpo", "trl": {**REWARDS, **(trl or {})}, "micro_batch_size": 8, **keys})
    return resolve(cfg, model_config("llama"), world_size=world_size)


def test_unset_trl_keys_take_trls_defaults_with_their_reason():
    plan = grpo_plan()
    assert plan.errors == []
    assert decision(plan, "rl_trainer") == ("GRPOTrainer", "auto")
    for key, value in {"trl.num_generations": 8, "trl.beta": 0.0, "trl.loss_type": "dapo", "trl.epsilon": 0.2,
                       "trl.epsilon_high": 0.2, "trl.importance_sampling_level": "token", "trl.scale_rewards": "group",
                       "trl.temperature": 1.0, "trl.max_completion_length": 512, "trl.reward_weights": [1.0]}.items():
        assert decision(plan, key) == (value, "default"), key
        assert plan.settings[key].reason
    assert decision(plan, "rl_reference_model") == ("none", "auto")  # beta 0: no reference
    assert decision(plan, "rl_rollout_backend") == ("transformers", "auto")
    assert decision(plan, "chunked_cross_entropy")[0] is False
    assert decision(plan, "trl.generation_batch_size") == (8, "default")
    assert decision(plan, "rl_prompts_per_generation") == (1, "auto")


def test_axolotls_readings_rl_beta_and_boolean_scale_rewards():
    plan = grpo_plan(rl_beta=0.04, trl={"scale_rewards": False})
    assert decision(plan, "trl.beta") == (0.04, "auto")
    assert decision(plan, "trl.scale_rewards") == ("none", "user")
    assert grpo_plan(trl={"beta": 0.1}, rl_beta=0.2).errors[0].key == "trl.beta"  # two values of one setting


@pytest.mark.parametrize("adapter, reference", [("lora", "adapter_disabled"), (None, "frozen_copy")])
def test_a_kl_term_brings_the_reference(adapter, reference):
    keys = {"adapter": adapter} if adapter else {}
    assert decision(grpo_plan(trl={"beta": 0.01}, **keys), "rl_reference_model") == (reference, "auto")


def test_the_generation_batch_must_hold_whole_groups_and_the_fix_says_how():
    plan = grpo_plan(trl={"num_generations": 3})
    (p,) = plan.errors
    assert p.key == "trl.num_generations" and "gradient_accumulation_steps: 3" in p.fix
    assert grpo_plan(trl={"num_generations": 3}, gradient_accumulation_steps=3).errors == []
    # Two processes: micro_batch_size x 2 x accumulation completions per generation.
    assert decision(grpo_plan(world_size=2, trl={"num_generations": 4}), "trl.generation_batch_size")[0] == 16


@pytest.mark.parametrize("trl, key", [
    ({"async_prefetch": True}, "trl.async_prefetch"),
    ({"replay_buffer_size": 100}, "trl.replay_buffer_size"),
    ({"sync_ref_model": True}, "trl.sync_ref_model"),
    ({"rollout_func": "env.rollout"}, "trl.rollout_func"),
    ({"reward_weights": [1.0, 2.0]}, "trl.reward_weights"),
    ({"reward_funcs": []}, "trl.reward_funcs"),
    ({"reward_funcs": ["digits"]}, "trl.reward_funcs.0"),
])
def test_refused_trl_keys_name_themselves(trl, key):
    assert key in error_keys(grpo_plan(trl=trl))


def test_axolotl_defaults_of_refused_keys_are_fine():
    assert grpo_plan(trl={"skip_zero_advantage_batches": True, "replay_buffer_size": 0}).errors == []


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_use_vllm_without_vllm_is_a_clear_refusal():
    (p,) = grpo_plan(trl={"use_vllm": True, "vllm_mode": "server"}).errors
    assert p.key == "trl.use_vllm" and "not installed" in p.message and "transformers" in p.fix


@pytest.mark.parametrize("keys, key", [
    ({"sample_packing": True}, "sample_packing"),
    ({"fsdp": ["full_shard", "auto_wrap"], "fsdp_config": {"fsdp_version": 2}}, "fsdp"),
    ({"remove_unused_columns": True}, "remove_unused_columns"),
])
def test_what_grpo_cannot_do_is_refused(keys, key):
    assert key in error_keys(grpo_plan(world_size=2 if "fsdp" in keys else 1, **keys))


def test_dataset_types_grpo_reads_and_a_transform_outside_grpo():
    assert grpo_plan(datasets=[{"path": "d.jsonl", "type": "rewards.to_prompt"}]).errors == []
    assert error_keys(grpo_plan(datasets=[{"path": "d.jsonl", "type": "alpaca"}])) == ["datasets.0.type"]
    cfg = config_from_dict({"base_model": "tiny:llama", "datasets": [{"path": "d.jsonl",
                                                                      "type": "chat_template.defualt"}]})
    (p,) = resolve(cfg, model_config("llama")).errors
    assert p.key == "datasets.0.type" and "did you mean `type: chat_template.default`" in p.fix


def test_grpo_config_carries_the_plans_settings(tmp_path):
    """Dr. GRPO, DAPO's clip-higher and GSPO's sequence-level ratios reach TRL's GRPOConfig."""
    plan = grpo_plan(trl={"loss_type": "dr_grpo", "epsilon_high": 0.28, "importance_sampling_level": "sequence",
                          "num_generations": 4, "max_completion_length": 16, "temperature": 0.7, "beta": 0.02,
                          "scale_rewards": "batch", "num_iterations": 2, "mask_truncated_completions": True},
                     output_dir=str(tmp_path), learning_rate=0.001)
    assert plan.errors == []
    args = grpo_arguments(plan, training_arguments(plan, has_eval=False))
    assert (args.loss_type, args.epsilon, args.epsilon_high, args.importance_sampling_level) == \
        ("dr_grpo", 0.2, 0.28, "sequence")
    assert (args.num_generations, args.max_completion_length, args.temperature, args.beta) == (4, 16, 0.7, 0.02)
    assert (args.scale_rewards, args.num_iterations, args.mask_truncated_completions) == ("batch", 2, True)
    assert args.learning_rate == 0.001 and args.remove_unused_columns is False and args.use_vllm is False
    assert args.generation_batch_size == 8 and args.steps_per_generation == 1


def test_user_functions_load_from_the_given_directory_with_clear_errors(tmp_path):
    (tmp_path / "my_rewards_mod.py").write_text("def good(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
                                                "VALUE = 3\n")
    fn = load_function("my_rewards_mod.good", "trl.reward_funcs.0", str(tmp_path))
    assert fn(prompts=["a"], completions=["b"]) == [1.0]
    with pytest.raises(UserError) as e:
        load_function("my_rewards_mod.bad", "trl.reward_funcs.1", str(tmp_path))
    assert e.value.problems[0].key == "trl.reward_funcs.1" and "defines: good" in e.value.problems[0].fix
    with pytest.raises(UserError) as e:
        load_function("my_rewards_mod.VALUE", "k", str(tmp_path))
    assert "not a function" in e.value.problems[0].message
    with pytest.raises(UserError) as e:
        load_function("nowhere_mod.f", "datasets.0.type", str(tmp_path))
    assert e.value.problems[0].key == "datasets.0.type" and "nowhere_mod.py not found" in e.value.problems[0].message


@pytest.mark.parametrize("returned, words", [
    ([1.0], "returned 1 rewards for 2 completions"),
    ("ab", "returned a str among its rewards"),
    (3.0, "not a list of rewards"),
])
def test_a_reward_function_returning_the_wrong_thing_is_named(returned, words):
    guarded = GuardedReward(lambda prompts, completions, **kw: returned, "rewards.r", "trl.reward_funcs.0")
    with pytest.raises(RewardFailed) as e:
        guarded(prompts=["p", "p"], completions=["a", "b"])
    assert e.value.problems[0].key == "trl.reward_funcs.0" and words in e.value.problems[0].message
    ok = GuardedReward(lambda prompts, completions, **kw: [1, None], "rewards.r", "k")
    assert ok(prompts=["p", "p"], completions=["a", "b"]) == [1.0, None] and ok.__name__ == "<lambda>"


def test_rollouts_are_seeded_per_completion_unless_generation_kwargs_sample_otherwise():
    plan = grpo_plan(world_size=2)
    assert decision(plan, "rl_rollout_seeding") == ("completion", "auto") and plan.grpo.rollout_seeding == "completion"
    assert "any number of processes" in plan.settings["rl_rollout_seeding"].reason
    own = grpo_plan(trl={"generation_kwargs": {"typical_p": 0.9}})
    assert decision(own, "rl_rollout_seeding") == ("process", "auto")
    assert "typical_p" in own.settings["rl_rollout_seeding"].reason
    # Settings the seeded sampler applies itself keep the seeding.
    assert grpo_plan(trl={"generation_kwargs": {"top_k": 5}}).grpo.rollout_seeding == "completion"


def test_generation_and_chat_template_kwargs_reach_the_grpo_config(tmp_path):
    plan = grpo_plan(trl={"generation_kwargs": {"top_k": 5, "no_repeat_ngram_size": 2},
                          "chat_template_kwargs": {"enable_thinking": False}}, output_dir=str(tmp_path))
    assert plan.grpo.generation_kwargs == {"top_k": 5, "no_repeat_ngram_size": 2}
    assert plan.grpo.chat_template_kwargs == {"enable_thinking": False}
    args = grpo_arguments(plan, training_arguments(plan, has_eval=False))
    assert args.generation_kwargs == {"top_k": 5, "no_repeat_ngram_size": 2}
    assert args.chat_template_kwargs == {"enable_thinking": False}
