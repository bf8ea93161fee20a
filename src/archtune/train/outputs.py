"""Run outputs besides the weights: train_summary.json and loss.png."""
from __future__ import annotations

import math
from pathlib import Path


def losses_from_history(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, eval loss) pairs from a Trainer's log_history."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    return train, evals


def plot_losses(log_history: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = losses_from_history(log_history)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), label="eval loss (token-weighted)", color="tab:orange", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- train_summary.json
# The fields every run's summary shares, supervised or preference, built here once; each recipe adds
# its own between them (train_summary.json keeps one key order).

def progress_fields(steps: int, train_losses: list[float], training_loss: float, eval_initial, eval_final,
                    train_tokens: int | None, seconds: float) -> dict:
    """Steps, losses, tokens and time of the run."""
    return {
        "steps": int(steps),
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "train_loss_mean": float(training_loss),
        "train_losses": train_losses,
        "eval_loss_initial": eval_initial,
        "eval_loss_final": eval_final,
        "train_tokens": train_tokens,
        "train_seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / max(1, steps), 4),
        "tokens_per_second": train_tokens / seconds if train_tokens is not None and seconds > 0 else None,
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def params_fields(trainable: int, total: int, weight_bytes: int) -> dict:
    """What trains, out of how much, and the loaded model's size in bytes."""
    return {"trainable_params": trainable, "total_params": total, "model_bytes": weight_bytes}


def strategy_name(plan) -> str:
    """How the plan's processes train: single, ddp or fsdp2, "+offload" with activation offloading."""
    if plan.world_size == 1:
        return "single"
    return plan.distributed.strategy + ("+offload" if plan.model.activation_offloading else "")


def processes_fields(plan, strategy: str) -> dict:
    """How many processes trained, and how."""
    return {"world_size": plan.world_size, "strategy": strategy,
            "ddp_find_unused_parameters": plan.distributed.ddp_find_unused_parameters}


def identity_fields(plan, data_stats: dict, skipped_steps, resume: Path | None) -> dict:
    """Which model, adapter and data, what was skipped, where the run resumed from, when it ended."""
    import time

    return {
        "family": plan.family.name,
        "model_type": plan.model_type,
        "adapter": plan.adapter.kind,
        "data": data_stats,
        "skipped_steps": skipped_steps,
        "resumed_from": resume.name if resume is not None else None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_summary(path: Path, summary: dict) -> Path:
    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    from archtune.train.checkpoints import write_json_atomic

    return write_json_atomic(path, {k: clean(v) for k, v in summary.items()})


# Files a finished run leaves as its weights: an adapter, or full weights with their config.
WEIGHT_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
                "model.safetensors", "model.safetensors.index.json", "train_summary.json")


def set_aside_previous_weights(output_dir: Path, checkpoints: bool = False) -> Path | None:
    """Move an earlier run's weights (and with `checkpoints`, its checkpoints and run record) out of
    the way, into output_dir/previous-<time>/, so a new run never mixes with them — e.g.
    transformers loads a stale adapter_config.json on top of new full weights, or a resume picks an
    old run's checkpoint. Nothing is deleted. Returns where they went, or None when there were none."""
    import time

    from archtune.train.checkpoints import STAGING, checkpoint_step
    from archtune.train.run_record import RECORD

    found = [p for p in (output_dir / n for n in WEIGHT_FILES) if p.exists()]
    found += sorted(output_dir.glob("model-*-of-*.safetensors"))
    if checkpoints:
        found += [p for p in sorted(output_dir.iterdir()) if checkpoint_step(p) is not None]
        found += [p for p in (output_dir / RECORD, output_dir / STAGING) if p.exists()]
    if not found:
        return None
    target = output_dir / time.strftime("previous-%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for p in found:
        p.rename(target / p.name)
    return target
