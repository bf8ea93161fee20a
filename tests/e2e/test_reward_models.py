"""Axolotl's reward-model configs (`model_type: AutoModelForSequenceClassification`, `reward_model:
true`, `num_labels: 1`) through `archtune train`, on every tiny family (each has a text decoder).

Each run trains a LoRA reward model for 6 steps on 8 bundled pairs, from a base model written to
disk (`init-tiny`), as a user's checkpoint is; a test plugin (tests/e2e/reward_probe.py) records
the parameters before and after training and the trained model's scores. Then the outputs are
reloaded as a user would, in transformers and PEFT (the base's AutoModelForSequenceClassification
plus the adapter, and the merged model of `archtune merge-lora`), and must give the trained model's
scores.
"""
from __future__ import annotations

import json

import pytest
import torch

from archtune.families import find_tiny
from archtune.models.tiny import tiny_model_names
from tests.e2e.conftest import REPO, head_jsonl, read_json, run_cli, write_config
from tests.e2e.reward_probe import PLUGIN, PROBE_ENV

PREF = REPO / "examples" / "data" / "preference"


def _load(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _max_score_diff(model, probe: dict[str, torch.Tensor]) -> float:
    model.eval()
    worst = 0.0
    with torch.no_grad():
        for i in range(sum(k.startswith("scores.") for k in probe)):
            scores = model(input_ids=probe[f"input_ids.{i}"], attention_mask=probe[f"attention_mask.{i}"]).logits
            worst = max(worst, float((scores.float() - probe[f"scores.{i}"]).abs().max()))
    return worst


class Runs:
    """One reward-model run per tiny model, shared by the tests of this module."""

    def __init__(self, root):
        self.root, self.done = root, {}

    def __call__(self, capsys, monkeypatch, tiny: str, adapter: str | None = "lora"):
        if (tiny, adapter) in self.done:
            return self.done[tiny, adapter]
        tmp = self.root / f"{tiny}-{adapter}"
        base = tmp / "base"
        code, _, err = run_cli(capsys, "init-tiny", tiny, base)
        assert code == 0, err[-3000:]
        pairs = head_jsonl(PREF / "reward_train.jsonl", tmp / "pairs.jsonl", 8)
        out, probe = tmp / "out", tmp / "probe"
        monkeypatch.setenv(PROBE_ENV, str(probe))
        cfg = write_config(
            tmp / "reward.yaml", base_model=str(base), model_type="AutoModelForSequenceClassification",
            reward_model=True, num_labels=1, **({"adapter": adapter, "lora_r": 8, "lora_alpha": 16} if adapter else {}),
            sequence_len=64, micro_batch_size=4, num_epochs=3, learning_rate=0.01 if adapter else 0.001, warmup_steps=1, logging_steps=1, seed=3,
            bf16=False, use_tensorboard=False, output_dir=str(out), plugins=[PLUGIN], allow_external_plugins=True,
            datasets=[{"path": str(pairs), "type": "bradley_terry.chat_template"}],
            test_datasets=[{"path": str(pairs), "type": "bradley_terry.chat_template"}])
        code, text, err = run_cli(capsys, "check", cfg, "--json")
        assert code == 0, err[-3000:]
        settings = json.loads(text)["settings"]
        assert settings["model_auto_class"]["value"] == "AutoModelForSequenceClassification"
        assert settings["num_labels"]["value"] == 1
        head = settings.get("reward_head_class")  # families transformers has no score-head class for
        assert head is None or (head["source"] == "family" and head["value"].endswith("ForSequenceClassification"))
        code, _, err = run_cli(capsys, "train", cfg)
        assert code == 0, err[-3000:]
        monkeypatch.delenv(PROBE_ENV)
        self.done[tiny, adapter] = (base, cfg, out, probe)
        return self.done[tiny, adapter]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("reward"))


@pytest.mark.parametrize("tiny", tiny_model_names())
def test_axolotl_reward_model_config_trains_the_score_head_and_reloads(capsys, monkeypatch, runs, tiny):
    family, _ = find_tiny(tiny)
    base, cfg, out, probe_dir = runs(capsys, monkeypatch, tiny)

    s = read_json(out / "train_summary.json")
    assert s["method"] == "reward" and s["family"] == family.name and s["steps"] == 6
    # The pairwise loss falls and the held-out margin (chosen - rejected reward) rises.
    assert s["train_loss_last"] < s["train_loss_first"]
    assert s["eval_loss_final"] < s["eval_loss_initial"]
    assert s["eval_rewards/margins"] > s["eval_rewards/margins_initial"]

    before, after = _load(probe_dir / "before.safetensors"), _load(probe_dir / "after.safetensors")
    trainable = set(json.loads((probe_dir / "trainable.json").read_text()))
    # The score head: num_labels outputs on the text decoder's hidden size, trained in full.
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(base).get_text_config().hidden_size
    head = [n for n in trainable if ".score." in f".{n}" and "lora_" not in n]
    assert head and all(after[n].shape == (1, hidden) and not torch.equal(before[n], after[n]) for n in head), head
    # LoRA trains on the language model alone (towers untouched); everything else stays as loaded.
    lora = [n for n in trainable if "lora_B" in n]
    assert lora and any(not torch.equal(before[n], after[n]) for n in lora)
    if family.mm_module_prefixes:
        assert all(f".{family.language_model_prefix}." in n for n in trainable if "lora_" in n)
    frozen = [n for n in before if n not in trainable]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    if family.mm_module_prefixes:
        towers = [n for n in frozen if any(f".{p}" in f".{n}" for p in family.mm_module_prefixes)]
        assert towers, "a multimodal tiny model has tower parameters"

    # Reloaded as a user would: transformers' Auto class (a family transformers lacks a head class for
    # registers archtune's first), the base checkpoint plus the adapter, and the merged model.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from archtune.models.heads import register_score_heads

    register_score_heads()
    probe = _load(probe_dir / "scores.safetensors")
    user = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), out)
    d1 = _max_score_diff(user, probe)
    assert d1 < 1e-5
    with user.disable_adapter():  # the comparison sees training: the base alone scores otherwise
        assert _max_score_diff(user, probe) > 1e-3
    code, _, err = run_cli(capsys, "merge-lora", cfg)
    assert code == 0, err[-3000:]
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    assert merged.config.num_labels == 1
    d2 = _max_score_diff(merged, probe)
    # archtune's own reload (evaluate) gives the held-out figures training ended with.
    code, text, err = run_cli(capsys, "evaluate", cfg, "--json")
    assert code == 0, err[-3000:]
    result = json.loads(text)
    assert result["eval_loss"] == pytest.approx(s["eval_loss_final"], abs=1e-5)
    assert result["eval_rewards/margins"] == pytest.approx(s["eval_rewards/margins"], abs=1e-5)
    assert d2 < 1e-4


def test_reward_model_exports_merged_and_adapter_verified_by_score_and_refuses_gguf(capsys, monkeypatch, runs):
    """`archtune export` of a reward model: merged weights (transformers) and the adapter (PEFT),
    each checked on the held-out pairs' scores; GGUF, which has no score head, refused by name."""
    _, cfg, out, _ = runs(capsys, monkeypatch, "llama")
    for fmt in ("merged", "adapter"):
        code, text, err = run_cli(capsys, "export", cfg, "--format", fmt, "--out", out / f"export-{fmt}", "--json")
        assert code == 0, err[-3000:]
        check = json.loads(text)["verification"]
        assert check["ok"] and check["prompts"] == 8 and check["max_abs_logit_diff"] < 1e-4, check
    code, _, err = run_cli(capsys, "export", cfg, "--format", "gguf")
    assert code == 2 and "--format" in err and "merged" in err


def test_a_new_score_head_is_drawn_from_seed_not_the_process_random_state(tmp_path):
    """A checkpoint has no score head: its initial weights follow `seed` (same seed, same head,
    whatever ran before in the process; another seed, another head)."""
    from archtune.config.schema import Config
    from archtune.models.load import load_model
    from archtune.models.tiny import write_tiny_model
    from archtune.train.recipe import plan_for

    base = write_tiny_model("llama", tmp_path / "base")
    pairs = head_jsonl(PREF / "reward_train.jsonl", tmp_path / "pairs.jsonl", 8)

    def head(seed: int, state: int) -> torch.Tensor:
        cfg = Config(base_model=str(base), reward_model=True, seed=seed, output_dir=str(tmp_path / "out"),
                     datasets=[{"path": str(pairs), "type": "bradley_terry.chat_template"}])
        setup = plan_for(cfg)
        torch.manual_seed(state)
        return load_model(setup.plan, setup.tokenizer).score.weight.detach().clone()

    first = head(3, 0)
    assert torch.equal(first, head(3, 1))
    assert not torch.equal(first, head(4, 0))


def test_full_fine_tune_trains_the_text_decoder_and_head_with_the_towers_frozen(capsys, monkeypatch, runs):
    """Gemma 4 E2B (vision and audio towers) without LoRA: the score head and the language model
    train, every tower parameter stays as loaded; the saved model reloads in transformers."""
    family, _ = find_tiny("gemma4-e2b")
    _, cfg, out, probe_dir = runs(capsys, monkeypatch, "gemma4-e2b", None)
    s = read_json(out / "train_summary.json")
    assert s["eval_rewards/margins"] > s["eval_rewards/margins_initial"] and s["eval_loss_final"] < s["eval_loss_initial"]
    before, after = _load(probe_dir / "before.safetensors"), _load(probe_dir / "after.safetensors")
    trainable = set(json.loads((probe_dir / "trainable.json").read_text()))
    towers = [n for n in before if n.startswith(family.mm_module_prefixes)]
    assert towers and not trainable & set(towers) and all(torch.equal(before[n], after[n]) for n in towers)
    decoder = [n for n in trainable if f"{family.language_model_prefix}.layers." in n]
    assert decoder and all(not torch.equal(before[n], after[n]) for n in ("score.weight", decoder[0]))
    from transformers import AutoModelForSequenceClassification

    from archtune.models.heads import register_score_heads

    register_score_heads()
    diff = _max_score_diff(AutoModelForSequenceClassification.from_pretrained(out), _load(probe_dir / "scores.safetensors"))
    assert diff < 1e-5


def test_a_checkpoint_without_pad_token_id_still_scores_padded_batches(tmp_path):
    """The score is read at each sequence's last non-padding token, found through the config's
    pad_token_id: a base without one gets the tokenizer's, so a padded batch scores each row as
    it scores alone (and a merged model saves that id)."""
    from archtune.config.schema import Config
    from archtune.models.load import load_model
    from archtune.models.tiny import write_tiny_model
    from archtune.train.recipe import plan_for

    base = write_tiny_model("llama", tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["pad_token_id"] = None
    (base / "config.json").write_text(json.dumps(config))
    pairs = head_jsonl(PREF / "reward_train.jsonl", tmp_path / "pairs.jsonl", 8)
    setup = plan_for(Config(base_model=str(base), reward_model=True, output_dir=str(tmp_path / "out"),
                            datasets=[{"path": str(pairs), "type": "bradley_terry.chat_template"}]))
    model = load_model(setup.plan, setup.tokenizer).eval()
    pad = setup.tokenizer.pad_token_id
    assert model.config.pad_token_id == pad
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    batch = torch.tensor([rows[0], rows[1] + [pad, pad]])
    with torch.no_grad():
        together = model(input_ids=batch, attention_mask=(batch != pad).long()).logits[:, 0]
        alone = torch.cat([model(input_ids=torch.tensor([r])).logits[:, 0] for r in rows])
    assert torch.allclose(together, alone, atol=1e-5)
