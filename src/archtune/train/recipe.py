"""The supervised training recipe, read top to bottom: plan, data, model, adapters, Trainer, save;
the steps every recipe shares (claiming output_dir, guards, staging, publishing) are
train/lifecycle.py's `RecipeRun`."""
from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass

from transformers.trainer_callback import ProgressCallback

from archtune.adapters.lora import count_params
from archtune.config.schema import Config
from archtune.data import PreparedData, prepare_data
from archtune.data.collate import DataCollator
from archtune.models.load import load_tokenizer, resolve_plan, set_chat_template
from archtune.plan import Plan
from archtune.train import distributed
from archtune.moe.quant4 import model_bytes
from archtune.moe.routing_stats import RoutingStats
from archtune.plugins import load_plugins
from archtune.train.callbacks import LossBar
from archtune.train.assembly import assemble_model, experts_implementation_in_use
from archtune.train.guards import batch_rows
from archtune.train.lifecycle import RecipeRun, training_arguments
from archtune.train.outputs import peak_rss_mb, plot_losses, strategy_name
from archtune.train.trainer import ArchtuneTrainer


@dataclass
class Setup:
    plan: Plan
    tokenizer: object
    _media: object = None

    @property
    def media(self):
        """How this run reads rows with images (data.MediaSetup); the processor is loaded once."""
        if self._media is None:
            self._media = media_setup(self.plan)
        return self._media


def plan_for(cfg: Config, world_size: int = 1) -> Setup:
    """Tokenizer + the Plan `archtune check` resolves (raises the Plan's errors as one UserError)."""
    tokenizer = load_tokenizer(cfg)
    plan = resolve_plan(cfg, world_size=world_size)
    plan.raise_errors()
    return Setup(plan, set_chat_template(tokenizer, plan))


# Why packed rows never hold images or audio (the packer keeps token ids and labels only; exact
# packing would also need each document's media inputs and image attention kept per document).
PACKING_IMAGES_REFUSED = ("packed rows keep token ids and labels only, and per-document image and audio inputs "
                          "are not built for packed batches")


def media_setup(plan: Plan):
    """The model's processor for rows with images or audio (data.MediaSetup), or why such rows are refused;
    a modality the processor has no part for is refused with its reason (models.load.media_gaps)."""
    from archtune.data import MediaSetup
    from archtune.data.media import ImageSettings, MediaProcessor
    from archtune.models.load import load_processor, media_gaps

    processor, refusal = load_processor(plan)
    if processor is None:
        return MediaSetup(refusal=refusal, packing_refusal=PACKING_IMAGES_REFUSED)
    gaps = media_gaps(plan, processor)
    media = MediaProcessor(processor, ImageSettings(plan.data.image_size, plan.data.image_resize_algorithm),
                           modalities=tuple(m for m in plan.family.modalities_of(plan.model_config) if m not in gaps),
                           refused=gaps)
    return MediaSetup(processor=media, packing_refusal=PACKING_IMAGES_REFUSED)


def data_collator(setup: Setup) -> DataCollator:
    """Batches as the plan pads them: to the longest row, a multiple of pad_to_multiple_of, or
    sequence_len (pad_to_sequence_len: `pad_to_length`). Padding carries label -100, so the loss is the same."""
    return DataCollator(setup.tokenizer, drop_attention_mask=setup.plan.drop_attention_mask, media=setup.media.processor,
                        **padding(setup.plan))


def padding(plan: Plan) -> dict:
    """The collator's padding keys, as the plan decided them."""
    return {"pad_to_multiple_of": plan.training.pad_to_multiple_of, "pad_to_length": plan.training.pad_to_length}


def train(cfg: Config, *, console=None) -> dict:
    """Run a fine-tune; returns the train summary (also written to output_dir).

    Under torchrun (WORLD_SIZE > 1) this process is one rank: the Plan is resolved for the real
    world size, the process joins the process group (gloo on CPU, NCCL on GPUs; collectives wait
    ddp_timeout), each node's first process preprocesses first, and only rank 0 prints and writes
    outputs. The process group is destroyed before returning.
    """
    setup = plan_for(cfg, world_size=distributed.world_size())
    created = distributed.init(timeout_seconds=setup.plan.training.ddp_timeout)
    ok = False
    try:
        summary = _train(cfg, setup, console if distributed.is_main() else None)
        ok = True
        return summary
    finally:
        if created:
            distributed.shutdown(synchronize=ok)


def _train(cfg: Config, setup: Setup, console) -> dict:
    # 1. Everything is checked before output_dir is touched: config, plan, resume, data, model.
    plan, tokenizer = setup.plan, setup.tokenizer
    run = RecipeRun.start(cfg, plan, tokenizer, console)
    if plan.preference.grpo:  # rl: grpo: online RL on TRL's GRPOTrainer (train/grpo.py)
        from archtune.train.grpo import train_grpo

        return train_grpo(run)
    if plan.preference.trainer:  # rl / reward_model: TRL's preference trainers (train/preference.py)
        from archtune.train.preference import train_preference

        return train_preference(run)

    # Each node's first process tokenizes into that node's cache, the node's other processes read it.
    with distributed.local_main_first():
        data: PreparedData = prepare_data(plan, tokenizer, progress=run.main, media=setup.media)
    distributed.same_on_every_rank(data_identity(data), "datasets", "training data",
                                   "give every node the same data files (and tokenizer) as node 0")
    plugins = load_plugins(cfg)
    rss_before_model_mb = _rss_mb()  # what the process holds before the model: the baseline of its training memory
    assembled = assemble_model(plan, tokenizer, "train", console=console, plugins=plugins,
                               sharded_later=plan.distributed.fsdp)
    model = assembled.model
    trainable, total = count_params(model)
    weight_bytes = model_bytes(model, adapters=False)  # the loaded model, before any sharding
    routing = RoutingStats.attach(model)  # MoE models: per-layer expert load (no experts: no hooks)

    # 2. Only now: output_dir is claimed (an earlier run set aside) and the run record written.
    run.claim_output_dir(data.stats)

    trainer = ArchtuneTrainer(
        model=model,
        args=training_arguments(plan, has_eval=data.eval is not None, steps_per_epoch=_steps_per_epoch(plan, data.train)),
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data_collator(setup),
        processing_class=tokenizer,
        callbacks=run.callbacks(plugins),
        fsdp=distributed.fsdp_settings(plan),
        own_shards=assembled.own_shards,
        nonfinite=run.guards.watch,
    )
    # Each rank's peak so far: loading the model, and (FSDP2) sharding it, before any step.
    load_peaks_mb = distributed.gather(peak_rss_mb())
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossBar())
    if routing.layers:
        routing.install(trainer)
    eval_initial = trainer.evaluate()["eval_loss"] if data.eval is not None else None
    pad_id = getattr(trainer.data_collator, "pad_token_id", None)
    result = run.train(trainer, name_rows=lambda batches: batch_rows(batches, data.train, pad_id))
    eval_final = trainer.evaluate()["eval_loss"] if data.eval is not None else None

    # 3. Final outputs: written under output_dir/.staging, renamed into place, the summary last.
    staged = run.stage(model, trainer)
    history = trainer.state.log_history  # train() starts a fresh state: the step-0 evaluation is added back
    if eval_initial is not None:
        history = [{"step": 0, "eval_loss": eval_initial}] + [h for h in history if h.get("step") != 0 or "eval_loss" not in h]
    train_tokens = int(trainer.state.num_input_tokens_seen)  # summed over all processes by the Trainer
    shared = run.summary_fields(trainer, result, eval_initial, eval_final, train_tokens, (trainable, total, weight_bytes),
                                strategy_name(plan), data.stats)
    summary = {
        **shared["progress"],
        "experts_load": routing.summary() if routing.layers else None,
        "experts_implementation": experts_implementation_in_use(model) if routing.layers else None,
        **shared["memory"],
        "rss_before_model_mb": round(rss_before_model_mb, 1),
        "rank_load_peak_rss_mb": load_peaks_mb,
        **shared["params"],
        "quantize_moe_experts": bool(plan.quantize_moe_experts),
        **shared["processes"],
        "chunked_cross_entropy": _chunked_loss_installed(trainer.model),
        "sharded_params": distributed.sharded_parameters(trainer.model),
        "loaded_own_shards": assembled.own_shards is not None,
        **shared["identity"],
    }
    title = f"{plan.training.base_model} ({plan.family.name}, {plan.adapter.kind or 'full'})"
    run.publish(staged, summary, plot=lambda path: plot_losses(history, path, title))
    return summary


def data_identity(data: PreparedData) -> str:
    """What must be equal on every node: the cache key (file contents, tokenizer, the keys that
    shape tokens) and the rows and tokens prepared."""
    stats = data.stats
    return (f"cache key {Path(str(stats.get('cache_dir'))).name[:12]}, {stats.get('train_rows')} rows, "
            f"{stats.get('train_tokens')} tokens")


def _rss_mb() -> float:
    """This process's resident memory now (MiB); 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _chunked_loss_installed(model) -> bool:
    from archtune.train.losses import ChunkedCrossEntropy

    return ChunkedCrossEntropy.of(model) is not None


def _steps_per_epoch(plan: Plan, train_rows) -> int:
    """Optimizer steps in one epoch over the (packed) training rows, over all processes."""
    return max(1, -(-len(train_rows) // plan.training.global_batch_size))

