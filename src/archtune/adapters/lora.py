"""LoRA through PEFT: module targets (list, regex, all-linear) and expert parameter targets."""
from __future__ import annotations

import torch

from archtune.errors import UserError
from archtune.plan import Plan


def lora_config(plan: Plan):
    from peft import LoraConfig

    cfg = plan.config
    targets = plan.get("lora_target_modules")
    parameters = plan.get("lora_target_parameters")
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets if targets else None,
        target_parameters=list(parameters) if parameters else None,
        modules_to_save=cfg.lora_modules_to_save,
        task_type="CAUSAL_LM",
        # A saved lm_head / embed_tokens stays tied to its twin (Gemma ties them), also when merged.
        ensure_weight_tying=bool(cfg.lora_modules_to_save),
    )


def apply_lora(model, plan: Plan):
    """Wrap `model` with LoRA adapters as the Plan says; seeded so the init is reproducible."""
    from peft import get_peft_model

    config = lora_config(plan)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.config.seed)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as exc:
            # PEFT says which targets matched nothing / are unsupported: a config problem.
            raise UserError.single("lora_target_modules", f"PEFT could not place the adapters: {exc}",
                                   "check lora_target_modules / lora_target_parameters against the model's module names") from None
    return peft_model


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
