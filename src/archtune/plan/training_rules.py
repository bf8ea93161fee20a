"""Generic rules for the training keys Axolotl users write: precision, attention, compile,
checkpointing, FSDP switched on by fsdp_config, optimizer and scheduler names, loggers, schedules,
adapters to start from and parameters to unfreeze. Each decides one setting (value, source,
reason) or refuses with the key and the fix; `archtune check` and `train` share them.

No family is named here; what runs on this machine (CUDA, installed packages) is read live.
"""
from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING

from archtune.plan.shared import Rule

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import Plan


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------- checkpointing, precision, compile

def _gradient_checkpointing_offload(plan: "Plan") -> None:
    if plan.get("gradient_checkpointing") != "offload":
        return
    plan.set("activation_offloading", True, "auto",
             "gradient_checkpointing: offload checkpoints every decoder layer and keeps its saved inputs in CPU memory")
    plan.set("gradient_checkpointing", False, "auto",
             "gradient_checkpointing: offload is done by activation_offloading's own per-layer checkpointing")


def _bf16_supported() -> bool:
    import torch

    return cuda_available() and torch.cuda.is_bf16_supported()


def _precision(plan: "Plan") -> None:
    bf16, fp16 = plan.get("bf16"), plan.get("fp16")
    if bf16 == "auto":
        on = _bf16_supported()
        plan.set("bf16", on, "auto", "bf16: auto: " + ("the GPU supports bfloat16" if on else
                                                       "no CUDA GPU with bfloat16 here, so fp32"))
    if fp16 == "auto":
        on = cuda_available() and not plan.get("bf16")
        plan.set("fp16", on, "auto", "fp16: auto: " + ("a CUDA GPU without bfloat16 (or bf16 off)" if on else
                                                       "bf16 is on or there is no CUDA GPU, so no fp16"))
    if plan.get("tf32") and not cuda_available():
        plan.set("tf32", False, "auto", "tf32 is an NVIDIA GPU (Ampere or newer) matmul mode; there is no CUDA GPU "
                 "here, so matmuls run in full fp32")
        plan.note("tf32: no effect here: there is no CUDA GPU; matmuls run in full fp32")


def _torch_compile(plan: "Plan") -> None:
    value = plan.get("torch_compile")
    if not value:
        return
    if cuda_available():
        plan.set("torch_compile", True, "user" if value is True else "auto", "torch.compile on CUDA")
        return
    plan.set("torch_compile", False, "auto", "torch.compile is only used on CUDA GPUs: on CPU its compile time "
             "outweighs its gain for fine-tuning, and some training graphs do not compile")
    plan.note("torch_compile: no effect here: there is no CUDA GPU, so the model runs uncompiled (same result)")


# ---------------------------------------------------------------- attention

_LEGACY_ATTN = {"flash": "flash_attention_2", "flex": "flex_attention", "sdp": "sdpa"}
_NEEDS_CUDA = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface", "xformers": "xformers",
               "sage": "sageattention", "fp8": None, "flex_attention": None}


def _attn_implementation(plan: "Plan") -> None:
    key = "attn_implementation"
    asked = plan.get(key)
    if asked is None:
        plan.set(key, "sdpa", "default", "PyTorch scaled-dot-product attention: exact, and per-document with packing")
        return
    asked = _LEGACY_ATTN.get(asked, asked)
    if asked in ("eager", "sdpa"):
        plan.set(key, asked, "user", "set in config")
        return
    package = _NEEDS_CUDA.get(asked, "kernels" if "/" in asked else None)
    known = asked in _NEEDS_CUDA or "/" in asked
    if not known:
        valid = ["eager", "sdpa", *_NEEDS_CUDA]
        close = difflib.get_close_matches(asked, valid, n=1, cutoff=0.6)
        plan.error(key, f"{asked!r} is not an attention implementation",
                   f"did you mean `{key}: {close[0]}`?" if close else f"use one of: {', '.join(valid)}")
        return
    if cuda_available() and (package is None or _installed(package)):
        plan.set(key, asked, "user", "set in config (CUDA)")
        return
    why = "there is no CUDA GPU" if not cuda_available() else f"the {package} package is not installed"
    plan.set(key, "sdpa", "auto", f"{asked} needs a CUDA GPU{f' and {package}' if package else ''}; {why}, so "
             "sdpa runs: the same attention values, exact per document with sample packing")
    plan.note(f"attn_implementation: {asked} runs as sdpa here ({why}): same attention values, packing stays exact")


# ---------------------------------------------------------------- FSDP from fsdp_config

def _fsdp_from_config(plan: "Plan") -> None:
    cfg = plan.config
    if plan.get("fsdp") or cfg.fsdp_config is None:
        return
    version = cfg.fsdp_config.fsdp_version
    plan.set("fsdp", ["full_shard", "auto_wrap"], "auto",
             f"fsdp_config is set (fsdp_version {version}): FSDP is on, as in Axolotl")


def _fsdp_single_process(plan: "Plan") -> None:
    if not plan.get("fsdp") or plan.world_size != 1:
        return
    plan.set("fsdp", None, "auto", "one process: FSDP has nothing to shard, so the model trains unsharded "
             "(the same computation); run with --nproc N to shard over N processes")
    plan.note("fsdp: one process, so training runs unsharded (same result); `archtune train --nproc N` shards")


# ---------------------------------------------------------------- optimizer and scheduler names

# Optimizers of Axolotl's own list that are transformers' under another name.
OPTIMIZER_ALIASES = {"ao_adamw_4bit": "adamw_torch_4bit", "ao_adamw_8bit": "adamw_torch_8bit"}
# Axolotl-only optimizers with no counterpart here.
AXOLOTL_ONLY_OPTIMIZERS = ("optimi_adamw", "ao_adamw_fp8", "adopt_adamw", "came_pytorch", "muon", "dion", "sinkgd",
                           "flash_adamw", "flash_adam", "flash_sgd", "flash_sgdw", "flash_lion", "q_galore_adamw8bit")
# The package an optimizer family needs, and its install line.
_OPTIMIZER_PACKAGES = (
    ("adamw_torch_4bit", "torchao", "pip install torchao"),
    ("adamw_torch_8bit", "torchao", "pip install torchao"),
    ("galore", "galore_torch", "pip install galore-torch"),
    ("apollo", "apollo_torch", "pip install apollo-torch"),
    ("lomo", "lomo_optim", "pip install lomo-optim"),
    ("adalomo", "lomo_optim", "pip install lomo-optim"),
    ("grokadamw", "grokadamw", "pip install grokadamw"),
    ("schedule_free", "schedulefree", "pip install schedulefree"),
    ("stable_adamw", "optimi", "pip install torch-optimi"),
    ("adamw_anyprecision", "torchdistx", "install torchdistx (https://github.com/pytorch/torchdistx)"),
    ("bnb", "bitsandbytes", "pip install bitsandbytes"),
    ("8bit", "bitsandbytes", "pip install bitsandbytes"),
    ("32bit", "bitsandbytes", "pip install bitsandbytes"),
)


# torchao optimizers with the same algorithm in bitsandbytes (8-bit blockwise-quantized AdamW moments);
# bitsandbytes has no 4-bit optimizer, so adamw_torch_4bit needs torchao.
TORCHAO_TO_BNB = {"adamw_torch_8bit": "adamw_bnb_8bit"}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def optimizer_names() -> list[str]:
    from transformers.training_args import OptimizerNames

    return [o.value for o in OptimizerNames]


def _optimizer(plan: "Plan") -> None:
    key = "optimizer"
    name = plan.get(key)
    if name in OPTIMIZER_ALIASES:
        plan.set(key, OPTIMIZER_ALIASES[name], "auto",
                 f"{name} is torchao's optimizer, which transformers names {OPTIMIZER_ALIASES[name]}")
        name = OPTIMIZER_ALIASES[name]
    names = optimizer_names()
    if name not in names:
        if name in AXOLOTL_ONLY_OPTIMIZERS:
            plan.error(key, f"{name!r} is an optimizer of Axolotl's own that archtune does not offer",
                       "use one of transformers' optimizers, e.g. adamw_torch, adamw_torch_8bit (torchao) or "
                       "adamw_bnb_8bit")
            return
        close = difflib.get_close_matches(str(name), names, n=2, cutoff=0.6)
        plan.error(key, f"{name!r} is not an optimizer name",
                   ("did you mean " + " or ".join(f"`optimizer: {c}`" for c in close) + "?") if close
                   else "use one of: " + ", ".join(names))
        return
    if "xla" in name or "npu" in name:
        plan.error(key, f"{name} runs only on {'TPU (torch_xla)' if 'xla' in name else 'Ascend NPU (torch_npu)'}",
                   "use adamw_torch (or adamw_torch_fused)")
        return
    if name in TORCHAO_TO_BNB and not _installed("torchao") and _installed("bitsandbytes"):
        mapped = TORCHAO_TO_BNB[name]
        plan.set(key, mapped, "auto",
                 f"{name} is torchao's AdamW with 8-bit blockwise-quantized moments; torchao is not installed, "
                 f"so the same algorithm runs through bitsandbytes (part of the install) as {mapped}; "
                 "`pip install torchao` to run torchao's own")
        plan.note(f"optimizer: {name} runs as {mapped} (bitsandbytes' 8-bit AdamW; torchao is not installed)")
        name = mapped
    if name.startswith("paged_") and not _cuda_available():
        plan.note(f"optimizer: {name} pages its state to CPU memory only on CUDA; here bitsandbytes runs it "
                  "unpaged (the same updates)")
    for part, module, install in _OPTIMIZER_PACKAGES:
        if part in name and not _installed(module):
            plan.error(key, f"optimizer {name} needs the {module} package, which is not installed",
                       f"{install} (or choose adamw_torch)")
            return
    if name.startswith(("galore", "apollo")):
        plan.error(key, f"{name} needs the modules it projects (optim_target_modules), which archtune does not offer",
                   "use adamw_torch, adamw_torch_8bit or adamw_bnb_8bit")


def scheduler_names() -> list[str]:
    from transformers import SchedulerType

    return [s.value for s in SchedulerType]


def _lr_scheduler(plan: "Plan") -> None:
    key = "lr_scheduler"
    name = plan.get(key)
    ratio = plan.get("cosine_min_lr_ratio")
    if ratio is not None:
        if name not in ("cosine", "cosine_with_min_lr"):
            plan.error("cosine_min_lr_ratio", f"cosine_min_lr_ratio is set but lr_scheduler is {name!r}",
                       "set `lr_scheduler: cosine`, or remove cosine_min_lr_ratio")
            return
        kwargs = dict(plan.section("lr_scheduler_kwargs") or {})
        kwargs["min_lr_rate"] = ratio
        plan.set(key, "cosine_with_min_lr", "auto", f"cosine_min_lr_ratio {ratio}: cosine decay to learning_rate * "
                 f"{ratio} (transformers' cosine_with_min_lr)")
        plan.set("lr_scheduler_kwargs", kwargs, "auto", "min_lr_rate from cosine_min_lr_ratio")
        return
    names = scheduler_names()
    if name == "one_cycle":
        plan.error(key, "one_cycle (Axolotl's OneCycleLR) is not offered", "use cosine or linear with warmup_steps")
    elif name not in names:
        close = difflib.get_close_matches(str(name), names, n=2, cutoff=0.6)
        plan.error(key, f"{name!r} is not a learning-rate scheduler name",
                   ("did you mean " + " or ".join(f"`lr_scheduler: {c}`" for c in close) + "?") if close
                   else "use one of: " + ", ".join(names))


# ---------------------------------------------------------------- loggers

def report_to(plan: "Plan") -> list[str]:
    """The Trainer integrations the config asks for (tensorboard is added by the recipe)."""
    cfg = plan.config
    out = []
    if cfg.use_wandb is not False and (cfg.use_wandb or cfg.wandb_project) and cfg.wandb_mode != "disabled":
        out.append("wandb")
    if cfg.use_mlflow is not False and (cfg.use_mlflow or cfg.mlflow_tracking_uri or cfg.mlflow_experiment_name):
        out.append("mlflow")
    return out


_LOGGER_PACKAGES = {"wandb": ("wandb", "pip install wandb"), "mlflow": ("mlflow", "pip install mlflow")}


def _loggers(plan: "Plan") -> None:
    wanted = report_to(plan)
    running = []
    for name in wanted:
        module, install = _LOGGER_PACKAGES[name]
        if _installed(module):
            running.append(name)
        else:
            plan.note(f"{name}: {module} is not installed, so the run is not logged there ({install} to log it)")
    if wanted:
        plan.set("report_to", running, "auto", "loggers the config asks for" + (
            "" if running == wanted else " that are installed"))


# ---------------------------------------------------------------- schedules

def _schedule(plan: "Plan") -> None:
    cfg = plan.config
    if cfg.saves_per_epoch and cfg.save_steps:
        plan.error("saves_per_epoch", "saves_per_epoch and save_steps are both set", "keep one of them")
    if cfg.evals_per_epoch and cfg.eval_steps:
        plan.error("evals_per_epoch", "evals_per_epoch and eval_steps are both set", "keep one of them")
    if cfg.save_strategy == "best":
        plan.error("save_strategy", "save_strategy: best needs a metric to pick the best checkpoint, which archtune "
                   "does not track (no load_best_model_at_end)", "use save_strategy: steps or epoch")


# ---------------------------------------------------------------- chat template

def _chat_template(plan: "Plan") -> None:
    from archtune.config.chat_templates import template_problem
    from archtune.families import chat_templates

    problem = template_problem(plan.config.chat_template, chat_templates())
    if problem:
        plan.error("chat_template", *problem)


# ---------------------------------------------------------------- adapters

def _lora_model_dir(plan: "Plan") -> None:
    cfg = plan.config
    if not cfg.lora_model_dir:
        return
    if cfg.adapter is None:
        plan.error("lora_model_dir", "lora_model_dir is set but adapter is not", "set `adapter: lora` (or qlora)")
        return
    path = Path(cfg.lora_model_dir)
    if path.exists() and not (path / "adapter_config.json").is_file():
        plan.error("lora_model_dir", f"{path} has no adapter_config.json: it is not a PEFT adapter directory",
                   "point lora_model_dir at the output_dir of a LoRA run")
    elif not path.exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        plan.error("lora_model_dir", f"{path} does not exist", "point lora_model_dir at a trained adapter's directory")


def unfrozen_pattern(pattern: str) -> re.Pattern:
    """An `unfrozen_parameters` entry as Axolotl reads it: `model.layers.0.*` is
    `model\\.layers\\.0\\.*` (dots literal unless followed by +), matched from the start."""
    return re.compile(re.sub(r"\.(?!\+)", r"\\.", pattern))


def _unfrozen_parameters(plan: "Plan") -> None:
    cfg = plan.config
    patterns = plan.get("unfrozen_parameters")
    if not patterns:
        return
    if cfg.adapter is not None:
        # Axolotl applies the patterns to the adapter-wrapped model, whose names start with base_model.model.,
        # so `^model...` patterns match nothing there; here the adapter decides what trains.
        plan.set("unfrozen_parameters", None, "auto", f"adapter: {cfg.adapter} trains the adapter; the base weights "
                 "stay frozen")
        plan.note(f"unfrozen_parameters: no effect with adapter: {cfg.adapter}: the adapter trains and the base weights "
                  "stay frozen (multimodal towers too, freeze_mm_modules); to train a base module fully with the "
                  "adapter, list it in lora_modules_to_save")
        return
    bad = []
    for p in patterns:
        if re.search(r"\[[0-9]*(:[0-9]*)?\]$", p):
            bad.append(f"{p!r} (index ranges that freeze part of a tensor are not supported)")
            continue
        try:
            unfrozen_pattern(p)
        except re.error as exc:
            bad.append(f"{p!r} ({exc})")
    if bad:
        plan.error("unfrozen_parameters", "cannot use: " + ", ".join(bad), "use whole-parameter patterns")
        return
    structure = plan.structure()
    if structure is not None:
        compiled = [unfrozen_pattern(p) for p in patterns]
        if not any(c.match(n) for n in structure.parameters for c in compiled):
            plan.error("unfrozen_parameters", "no parameter of this model matches " + ", ".join(patterns),
                       "patterns match parameter names from the start, e.g. "
                       + next(iter(structure.parameters), "model.layers.0.mlp.up_proj.weight"))


def _lora_target_modules_match(plan: "Plan") -> None:
    """A target list or regex that matches no module of the model is refused here, before any weight
    loads (the adapter step would stop on it at train time)."""
    cfg = plan.config
    spec = plan.get("lora_target_modules")
    if cfg.adapter is None or cfg.lora_target_linear or not spec or (isinstance(spec, str) and spec.lower() == "all-linear"):
        return
    structure = plan.structure()
    if structure is None:
        return
    if isinstance(spec, str):
        regex = re.compile(spec)
        hit = any(regex.fullmatch(n) for n in structure.module_names)
    else:
        hit = any(n == e or n.endswith("." + e) for n in structure.module_names for e in map(str, spec))
    if not hit:
        layer = [n[: -len(".weight")] for n, shape in structure.parameters.items()
                 if n.endswith(".weight") and len(shape) == 2 and ".0." in n]
        plan.error("lora_target_modules", f"{spec!r} matches no module of this model",
                   "a list entry must equal a module name or its dotted end (e.g. q_proj); a string is a regex over "
                   "whole names; this model's modules are named like " + ", ".join(layer[:4]))


TRAINING_RULES: tuple[Rule, ...] = (
    Rule("gradient_checkpointing_offload",
         "`gradient_checkpointing: offload` turns on activation_offloading (each layer checkpointed, its inputs kept "
         "in CPU memory) in place of plain checkpointing.", _gradient_checkpointing_offload),
    Rule("precision", "`bf16: auto` / `fp16: auto` resolve to what the GPU supports (fp32 without CUDA); `tf32` "
         "applies on NVIDIA GPUs only.", _precision),
    Rule("torch_compile", "`torch_compile` compiles the model on CUDA GPUs; elsewhere it runs uncompiled with an "
         "info line.", _torch_compile),
    Rule("attn_implementation", "`attn_implementation` (and Axolotl's flash_attention/sdp_attention/flex_attention "
         "flags) runs as asked where the kernel exists, else as sdpa with an info line; every choice is exact with "
         "sample packing.", _attn_implementation),
    Rule("fsdp_from_config", "An `fsdp_config` (or `fsdp_version`) turns FSDP on by itself, as in Axolotl.",
         _fsdp_from_config),
    Rule("fsdp_single_process", "FSDP with one process trains unsharded (the same computation), with an info line.",
         _fsdp_single_process),
    Rule("optimizer", "`optimizer` must be one of transformers' optimizer names (torchao's ao_adamw_4bit/8bit map to "
         "adamw_torch_4bit/8bit) whose package is installed; otherwise `check` names the install line or the "
         "closest name. adamw_torch_8bit without torchao runs as bitsandbytes' 8-bit AdamW (adamw_bnb_8bit), "
         "the same algorithm.", _optimizer),
    Rule("lr_scheduler", "`lr_scheduler` must be a transformers scheduler name; `cosine_min_lr_ratio` selects "
         "cosine_with_min_lr.", _lr_scheduler),
    Rule("loggers", "`wandb_*` and `mlflow_*` keys log through the Trainer's integrations when the package is "
         "installed; otherwise an info line gives the install command.", _loggers),
    Rule("schedule", "`saves_per_epoch` / `evals_per_epoch` exclude save_steps / eval_steps, and `save_strategy: "
         "best` (which needs a tracked metric) is refused.", _schedule),
    Rule("chat_template", "`chat_template` must be tokenizer_default, a built-in template name (chatml, llama3, "
         "gemma3, gemma4, qwen3, qwen3_5, ...) or a Jinja string; other names are refused before training.",
         _chat_template),
    Rule("lora_model_dir", "`lora_model_dir` must be a trained PEFT adapter directory, with an adapter set.",
         _lora_model_dir),
    Rule("unfrozen_parameters", "`unfrozen_parameters` (full fine-tune only) must match parameters of the model.",
         _unfrozen_parameters),
    Rule("lora_target_modules_match", "`lora_target_modules` (names or a regex) must match modules of the model; "
         "`check` refuses one that matches nothing.", _lora_target_modules_match),
)
