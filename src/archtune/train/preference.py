"""Preference and reward training on TRL's trainers: DPO and IPO (DPOTrainer), KTO (KTOTrainer),
ORPO (ORPOTrainer), SimPO (CPOTrainer, loss "simpo") and Bradley-Terry reward models
(RewardTrainer).

archtune builds the model exactly as for supervised fine-tuning (the Plan's family rules: towers
frozen, LoRA confined to the language model, expert LoRA, experts implementation, checkpointing,
DDP's find_unused_parameters) and tokenizes the data itself (data/preference.py); the TRL trainer
gets the prepared model, the tokenized rows, and TrainingArguments from the same Plan. What the
subclasses here add to TRL's trainers, and nothing else:

- the tokenized rows go in as they are (TRL does not re-render or re-tokenize them);
- text-only batches of a multimodal wrapper get the zero "no image here" inputs its forward takes
  (as ArchtuneTrainer does for supervised training);
- evaluation is exact and the same for every method: each held-out answer's reward is computed per
  row, and the metrics are means over rows (pairs), not means of per-batch means.

Rewards, as TRL defines them per method: DPO, IPO and KTO: beta * (log p_policy - log p_reference)
of the answer (summed over its tokens); ORPO and SimPO: beta * the mean token log-probability of
the answer; a reward model: its score. On pairs, `rewards/accuracies` is the fraction of pairs whose
chosen answer gets the higher reward and `rewards/margins` the mean difference. On unpaired (KTO)
rows, chosen/rejected are the mean rewards of the desirable/undesirable answers and accuracies is
the fraction of (desirable, undesirable) pairs ranked right.

The reference model: with LoRA, the base model with the adapter disabled (no second copy); with
full fine-tuning, a frozen copy built like the policy (TRL's default); ORPO, SimPO and reward
models have none.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


# ---------------------------------------------------------------- TRL's configs from the Plan

def method(plan) -> str:
    return str(plan.preference.method)


def trl_arguments(plan, base_args):
    """The TRL config of the Plan's method: `base_args` (archtune's TrainingArguments for this Plan)
    field by field, plus the method's own settings (all resolved by the Plan)."""
    from transformers import TrainingArguments

    kind = method(plan)
    cls = _config_class(kind)
    common = {f.name: getattr(base_args, f.name) for f in fields(TrainingArguments) if f.init}
    extra: dict[str, Any] = {"max_length": plan.data.sequence_len, "disable_dropout": True}
    p = plan.preference
    if kind in ("dpo", "ipo"):
        extra.update(beta=p.beta, loss_type=list(p.loss_type), loss_weights=p.loss_weights,
                     label_smoothing=p.label_smoothing, use_weighting=p.use_weighting, ld_alpha=p.ld_alpha,
                     padding_free=False, pad_to_multiple_of=None)
    elif kind == "kto":
        extra.update(beta=p.beta, desirable_weight=p.kto_desirable_weight,
                     undesirable_weight=p.kto_undesirable_weight, pad_to_multiple_of=None)
        # KTO's KL term pairs each row with its neighbour in a batch fixed when the data is prepared:
        # TRL requires the rows in data order.
        common["train_sampling_strategy"] = "sequential"
    elif kind in ("orpo", "simpo"):
        extra.update(beta=p.beta)
        if kind == "simpo":
            extra.update(loss_type="simpo", simpo_gamma=p.simpo_gamma, cpo_alpha=p.cpo_alpha)
    elif kind == "reward":
        extra.update(center_rewards_coefficient=p.center_rewards_coefficient, pad_to_multiple_of=None)
    return cls(**common, **extra)


def _config_class(kind: str):
    if kind in ("dpo", "ipo"):
        from trl import DPOConfig
        return DPOConfig
    if kind == "kto":
        from trl import KTOConfig
        return KTOConfig
    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig
        return ORPOConfig
    if kind == "simpo":
        from trl.experimental.cpo import CPOConfig
        return CPOConfig
    from trl import RewardConfig
    return RewardConfig


# ---------------------------------------------------------------- the trainers

class PreferenceTrainerMixin:
    """Mixed into each TRL trainer (before it in the MRO)."""

    reward_kind: str = "dpo"
    eval_rows: Any = None  # the held-out rows, as data/preference.py wrote them

    # -- data: archtune tokenized it
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    # -- text-only batches of multimodal wrappers
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from archtune.patches.text_only import text_only_extras

        extras = text_only_extras(model, inputs)
        if extras:
            inputs = {**inputs, **extras}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    # -- evaluation: exact per-row rewards, the same for every method
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        rows = self.eval_rows if eval_dataset is None else eval_dataset
        if rows is None:
            return {}
        metrics = {f"{metric_key_prefix}_{k}": v
                   for k, v in preference_metrics(Scorer.of_trainer(self), rows).items()}
        from transformers import Trainer

        Trainer.log(self, metrics)  # past TRL's log, which would mix in its per-batch means
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def _kl_rotation(dataset, batch_size: int):
    """KTO's KL term pairs each prompt with the answer of the previous row of its batch
    (TRL's rule: the completions rotated by one within each batch of per_device_train_batch_size)."""
    def rotate(batch):
        batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
        return batch

    return dataset.map(rotate, batched=True, batch_size=batch_size, desc="KTO: mismatched answers for the KL term")


def _to_orpo_features(feature: dict, max_length: int) -> dict:
    """archtune's paired columns as the (experimental) ORPO/CPO trainers' tokenized columns."""
    prompt = list(feature["prompt_ids"])
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for name in ("chosen", "rejected"):
        ids = (prompt + list(feature[f"{name}_ids"]))[:max_length]
        labels = ([-100] * len(prompt) + list(feature[f"{name}_ids"]))[:max_length]
        out.update({f"{name}_input_ids": ids, f"{name}_attention_mask": [1] * len(ids), f"{name}_labels": labels})
    return out


def trainer_class(kind: str):
    """The TRL trainer of a method with the mixin applied."""
    if kind in ("dpo", "ipo"):
        from trl import DPOTrainer as base
    elif kind == "kto":
        from trl import KTOTrainer as base
    elif kind == "orpo":
        from trl.experimental.orpo import ORPOTrainer as base
    elif kind == "simpo":
        from trl.experimental.cpo import CPOTrainer as base
    else:
        from trl import RewardTrainer as base
    from archtune.train.trainer import CrashSafeTrainer

    body: dict[str, Any] = {"reward_kind": kind}
    if kind == "kto":
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if self.calculate_KL and "completion_ids" in dataset.column_names:
                return _kl_rotation(dataset, args.per_device_train_batch_size)
            return dataset
        body["_prepare_dataset"] = _prepare_dataset
    if kind in ("orpo", "simpo"):
        def tokenize_row(self, feature, model=None):
            return _to_orpo_features(feature, self.max_length)

        def _track_num_input_tokens(self, inputs):
            # Their batches hold chosen_/rejected_input_ids (each with its prompt), not the `input_ids`
            # the Trainer counts: the real tokens of both sequences, summed over all processes.
            tokens = sum(inputs[f"{name}_attention_mask"].sum() for name in ("chosen", "rejected"))
            tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()
        body["tokenize_row"] = tokenize_row
        body["_track_num_input_tokens"] = _track_num_input_tokens
    return type(f"Archtune{base.__name__}", (PreferenceTrainerMixin, CrashSafeTrainer, base), body)


def build_trainer(plan, model, tokenizer, data, args, callbacks, nonfinite=None):
    """The Plan's TRL trainer around the prepared model and data (`nonfinite`: the run's
    NonFiniteWatch, train/guards.py)."""
    kind = method(plan)
    cls = trainer_class(kind)
    train = data.train
    # eval_dataset only satisfies the Trainer's checks: evaluation reads trainer.eval_rows.
    kwargs: dict[str, Any] = {"model": model, "args": args, "train_dataset": train, "eval_dataset": data.eval,
                              "processing_class": tokenizer, "callbacks": callbacks, "nonfinite": nonfinite}
    if kind in ("dpo", "ipo", "kto"):
        kwargs["ref_model"] = None  # LoRA: the adapter disabled; full fine-tune: TRL's frozen copy (below)
    trainer = _construct(cls, kwargs, plan, model)
    trainer.eval_rows = data.eval
    return trainer


def _construct(cls, kwargs: dict, plan, model):
    """TRL's DPO/KTO trainers build the frozen reference of a full fine-tune from the model's hub id
    or directory; archtune's model may be a tiny one built in memory, so the reference is a deep copy
    of the prepared policy (frozen, evaluation mode), made before any training step."""
    import copy

    if plan.preference.reference_model == "frozen_copy":
        ref = copy.deepcopy(model)
        ref.requires_grad_(False)
        ref.eval()
        kwargs["ref_model"] = ref
    return cls(**kwargs)


# ---------------------------------------------------------------- exact evaluation

def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def _answer_logps(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int, device,
                  max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(answer | prompt) summed over the answer's tokens, the number of those tokens) per row,
    the sequence cut to max_length as TRL cuts it."""
    from archtune.patches.text_only import text_only_extras

    seqs = [(list(p) + list(a))[:max_length] for p, a in zip(prompts, answers)]
    input_ids = _pad(seqs, pad_id).to(device)
    attention = _pad([[1] * len(s) for s in seqs], 0).to(device)
    mask = _pad([([0] * len(p) + [1] * len(a))[:max_length] for p, a in zip(prompts, answers)], 0).to(device)
    batch = {"input_ids": input_ids, "attention_mask": attention}
    batch.update(text_only_extras(model, batch))
    logits = model(**batch, use_cache=False).logits[:, :-1].float()
    target = input_ids[:, 1:]
    token_logps = torch.gather(F.log_softmax(logits, dim=-1), 2, target.unsqueeze(-1)).squeeze(-1)
    m = mask[:, 1:].to(token_logps.dtype)
    return (token_logps * m).sum(-1), m.sum(-1)


def _scores(model, seqs: list[list[int]], pad_id: int, device, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a reward model's score, the sequence's tokens) per sequence (transformers' sequence
    classification head reads the last non-padding token)."""
    from archtune.patches.text_only import text_only_extras

    seqs = [list(s)[:max_length] for s in seqs]
    input_ids = _pad(seqs, pad_id).to(device)
    attention = _pad([[1] * len(s) for s in seqs], 0).to(device)
    batch = {"input_ids": input_ids, "attention_mask": attention}
    batch.update(text_only_extras(model, batch))
    scores = model(**batch, use_cache=False).logits[:, 0].float()
    return scores, attention.sum(-1)


@dataclass
class Scorer:
    """What computing held-out rewards needs: the method, the policy, its reference (None: the
    policy with its adapter disabled, or the policy itself when it has none), beta, a reward
    model's center_rewards_coefficient, and batching."""

    kind: str
    policy: Any
    reference: Any = None
    beta: float = 0.1
    pad_id: int = 0
    device: Any = "cpu"
    max_length: int = 10**9
    batch_size: int = 8
    center: float = 0.0

    @classmethod
    def of_trainer(cls, trainer) -> "Scorer":
        unwrap = trainer.accelerator.unwrap_model
        ref = getattr(trainer, "ref_model", None)
        tok = trainer.processing_class
        return cls(trainer.reward_kind, unwrap(trainer.model), unwrap(ref) if ref is not None else None,
                   float(getattr(trainer.args, "beta", 0.0) or 0.0), _pad_id(tok), trainer.args.device,
                   trainer.args.max_length or 10**9, trainer.args.per_device_eval_batch_size,
                   float(getattr(trainer.args, "center_rewards_coefficient", 0.0) or 0.0))

    @contextlib.contextmanager
    def reference_model(self):
        if self.reference is not None:
            yield self.reference
        elif hasattr(self.policy, "disable_adapter"):
            with self.policy.disable_adapter():
                yield self.policy
        else:  # no trained adapter (evaluating the base model): the policy is its own reference
            yield self.policy

    @torch.no_grad()
    def rewards(self, rows: dict[str, list]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """{answer column: (rewards, the policy's summed log-probabilities (a reward model: its
        scores), tokens)} for `rows` (a slice of held-out rows)."""
        out = {}
        for col in (c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in rows):
            if self.kind == "reward":
                scores, tokens = _scores(self.policy, rows[col], self.pad_id, self.device, self.max_length)
                out[col] = (scores, scores, tokens)
                continue
            logps, tokens = _answer_logps(self.policy, rows["prompt_ids"], rows[col], self.pad_id, self.device,
                                          self.max_length)
            if self.kind in ("orpo", "simpo"):  # the mean token log-probability, no reference
                out[col] = (self.beta * logps / tokens.clamp(min=1), logps, tokens)
                continue
            with self.reference_model() as ref:
                reference, _ = _answer_logps(ref, rows["prompt_ids"], rows[col], self.pad_id, self.device,
                                             self.max_length)
            out[col] = (self.beta * (logps - reference), logps, tokens)
        return out


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else pad


def preference_metrics(scorer: Scorer, dataset) -> dict[str, float]:
    """Over `dataset`, exact and per row (never a mean of per-batch means):

    rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins; rows (pairs, or
    desirable plus undesirable rows);
    loss and tokens: the token-weighted cross-entropy of the preferred answers given their prompts
    (the chosen answers, or KTO's desirable ones): the sum of their tokens' losses over the number
    of those tokens, as `archtune evaluate` computes eval_loss for supervised data, so the two
    compare. A reward model predicts no tokens: its loss is the mean over pairs of its training
    loss, -log sigmoid(chosen - rejected) (+ center_rewards_coefficient * (chosen + rejected)^2),
    and tokens counts the tokens it scored."""
    models = [m for m in (scorer.policy, scorer.reference) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    parts: dict[str, list[tuple]] = {}
    labels: list[bool] = []
    try:
        for start in range(0, len(dataset), scorer.batch_size):
            rows = dataset[start:start + scorer.batch_size]
            for col, r in scorer.rewards(rows).items():
                parts.setdefault(col, []).append(tuple(t.cpu() for t in r))
            labels += list(rows.get("label", []))
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    cat = {col: [torch.cat(ts).double() for ts in zip(*v)] for col, v in parts.items()}  # rewards, logps, tokens
    r = {col: v[0] for col, v in cat.items()}
    if "chosen_ids" in r:  # pairs
        chosen, rejected = r["chosen_ids"], r["rejected_ids"]
        metrics = {"rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean()),
                   "rewards/accuracies": float((chosen > rejected).double().mean()),
                   "rewards/margins": float((chosen - rejected).mean()), "rows": len(chosen)}
        good = torch.ones(len(chosen), dtype=torch.bool)
        preferred = cat["chosen_ids"]
    else:
        good = torch.tensor(labels, dtype=torch.bool)
        desirable, undesirable = r["completion_ids"][good], r["completion_ids"][~good]
        chosen_mean = float(desirable.mean()) if len(desirable) else math.nan
        rejected_mean = float(undesirable.mean()) if len(undesirable) else math.nan
        ranked = ((desirable[:, None] > undesirable[None, :]).double().mean()
                  if len(desirable) and len(undesirable) else torch.tensor(math.nan))
        metrics = {"rewards/chosen": chosen_mean, "rewards/rejected": rejected_mean,
                   "rewards/accuracies": float(ranked), "rewards/margins": chosen_mean - rejected_mean,
                   "rows": int(len(good))}
        preferred = cat["completion_ids"]
    if scorer.kind == "reward":
        c, rj = r["chosen_ids"], r["rejected_ids"]
        per_pair = -F.logsigmoid(c - rj) + scorer.center * (c + rj) ** 2
        metrics["loss"] = float(per_pair.mean())
        metrics["tokens"] = int(cat["chosen_ids"][2].sum() + cat["rejected_ids"][2].sum())
    else:
        logps, tokens = preferred[1][good], preferred[2][good]
        metrics["tokens"] = int(tokens.sum())
        metrics["loss"] = float(-logps.sum() / tokens.sum()) if metrics["tokens"] else math.nan
    return metrics


def evaluate_preference(plan, tokenizer, *, progress: bool = True) -> tuple[dict, str]:
    """`archtune evaluate` for rl / reward_model configs: ({eval_loss, eval_tokens, eval_rows and the
    held-out rewards}, which weights: adapter / full / base) of the trained weights in output_dir
    (against the base model as the reference), else of the base model."""
    from archtune.data.preference import prepare_preference_data
    from archtune.errors import UserError
    from archtune.train.assembly import assemble_model

    data = prepare_preference_data(plan, tokenizer, progress=progress)
    if data.eval is None:
        raise UserError.single("test_datasets", "there is no evaluation data", "set test_datasets, or val_set_size > 0")
    policy = assemble_model(plan, tokenizer, "evaluate")
    weights = policy.weights
    reference = None
    if weights == "full" and plan.preference.reference_model not in (None, "none"):
        reference = assemble_model(plan, tokenizer, "reference").model
    beta = plan.preference.beta or 0.0
    scorer = Scorer(method(plan), policy.model, reference, float(beta), _pad_id(tokenizer), "cpu",
                    plan.data.sequence_len, plan.training.eval_micro_batch_size,
                    float(plan.preference.center_rewards_coefficient or 0.0))
    return {f"eval_{k}": v for k, v in preference_metrics(scorer, data.eval).items()}, weights


def batch_rows(batches: list[dict], data, max_length: int | None, limit: int = 16) -> list[str]:
    """Where each row of a step's `batches` came from (FILE:LINE), for the non-finite stop: every
    sequence of a batch (prompt + answer, or a reward model's whole sequence, cut to max_length
    as TRL cuts it) is looked up among the training rows' sequences; a pair is named once."""
    cut = slice(None, max_length or None)
    where: dict[tuple, str] = {}
    for row, source in zip(data.train, data.train_sources):
        prompt = list(row.get("prompt_ids") or [])
        for col in ("chosen_ids", "rejected_ids", "completion_ids"):
            if row.get(col) is not None:
                where.setdefault(tuple((prompt + list(row[col]))[cut]), source or "a training row")
    names: list[str] = []
    for batch in batches:
        for key, ids in batch.items():
            if not key.endswith("input_ids") or key.startswith(("prompt", "KL")):
                continue  # a prompt alone, or KTO's mismatched pairs
            mask = batch.get(key.replace("input_ids", "attention_mask"))
            for r in range(ids.shape[0]):
                n = int(mask[r].sum()) if mask is not None else ids.shape[1]
                name = where.get(tuple(ids[r, :n].tolist()), f"a sequence of {n} tokens (not found in the training data)")
                if name not in names:
                    names.append(name)
                if len(names) >= limit:
                    return names + ["..."]
    return names


# ---------------------------------------------------------------- the recipe's preference branch

def train_preference(run) -> dict:
    """Data, model, TRL trainer, initial evaluation, training, final evaluation, outputs: the
    preference counterpart of the supervised recipe, through the same lifecycle (`run`: a
    train.lifecycle.RecipeRun: output_dir claim, run record, guards, resume, staged outputs)."""
    from transformers.trainer_callback import ProgressCallback

    from archtune.adapters.lora import count_params
    from archtune.data.preference import prepare_preference_data
    from archtune.moe.quant4 import model_bytes
    from archtune.plugins import load_plugins
    from archtune.train import distributed
    from archtune.train.assembly import assemble_model, experts_implementation_in_use
    from archtune.train.callbacks import LossBar
    from archtune.train.lifecycle import training_arguments

    plan, tokenizer = run.plan, run.tokenizer
    with distributed.local_main_first():
        data = prepare_preference_data(plan, tokenizer, progress=run.main)
    plugins = load_plugins(run.cfg)
    model = assemble_model(plan, tokenizer, "train", console=run.console, plugins=plugins).model
    trainable, total = count_params(model)
    weight_bytes = model_bytes(model, adapters=False)  # the loaded policy (QLoRA: its 4-bit base)
    run.claim_output_dir(data.stats)
    args = trl_arguments(plan, training_arguments(plan, has_eval=data.eval is not None))
    trainer = build_trainer(plan, model, tokenizer, data, args, run.callbacks(plugins), nonfinite=run.guards.watch)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossBar())
    initial = trainer.evaluate() if data.eval is not None else {}
    result = run.train(trainer, name_rows=lambda batches: batch_rows(batches, data, args.max_length))
    final = trainer.evaluate() if data.eval is not None else {}

    staged = run.stage(model, trainer)
    history = trainer.state.log_history
    if initial:
        history = [{"step": 0, **initial}] + [h for h in history if not (h.get("step") == 0 and "eval_rows" in h)]
    train_logs = [h for h in history if "loss" in h]
    # Tokens the model read (prompt + answer of every sequence, over all processes).
    train_tokens = int(trainer.state.num_input_tokens_seen) or None
    # eval_loss is computed exactly as `evaluate` computes it (preference_metrics: the preferred answers'
    # token-weighted cross-entropy; a reward model's pairwise loss).
    shared = run.summary_fields(trainer, result, initial.get("eval_loss"), final.get("eval_loss"), train_tokens,
                                (trainable, total, weight_bytes), "single" if plan.world_size == 1 else "ddp", data.stats)
    summary = {
        "method": method(plan),
        "trainer": plan.preference.trainer,
        "reference_model": plan.preference.reference_model,
        **shared["progress"],
        "experts_implementation": experts_implementation_in_use(model),
        **shared["memory"],
        **shared["params"],
        **shared["processes"],
        **shared["identity"],
    }
    last = train_logs[-1] if train_logs else {}
    for key in REWARD_KEYS:
        summary[key] = last.get(key)  # the last logged training values
        summary[f"eval_{key}"] = final.get(f"eval_{key}")
        summary[f"eval_{key}_initial"] = initial.get(f"eval_{key}")
    title = f"{plan.training.base_model} ({plan.family.name}, {method(plan)}, {plan.adapter.kind or 'full'})"
    run.publish(staged, summary, plot=lambda path: plot_preference(history, path, title))
    return summary


def plot_preference(history: list[dict], path, title: str):
    """loss.png for a preference run: the training loss, and the reward margin and accuracy (training
    logs as lines, held-out evaluations as points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    if train:
        left.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    left.set_xlabel("optimizer step")
    left.set_ylabel("loss")
    left.set_title(title, fontsize=9)
    left.grid(alpha=0.3)
    left.legend()
    for key, color in (("rewards/margins", "tab:green"), ("rewards/accuracies", "tab:orange")):
        pts = [(h["step"], h[key]) for h in history if key in h and "step" in h]
        if pts:
            right.plot(*zip(*pts), label=f"train {key}", color=color, linewidth=1.0, alpha=0.6)
        evals = [(h["step"], h[f"eval_{key}"]) for h in history if f"eval_{key}" in h and "step" in h]
        if evals:
            right.plot(*zip(*evals), label=f"held-out {key}", color=color, marker="o", linewidth=1.5)
    right.set_xlabel("optimizer step")
    right.set_title("rewards (held-out: exact, per pair)", fontsize=9)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["REWARD_KEYS", "PreferenceTrainerMixin", "Scorer", "batch_rows", "build_trainer", "evaluate_preference", "method",
           "plot_preference", "preference_metrics", "train_preference", "trainer_class", "trl_arguments"]
