"""Load the base model and tokenizer: local directory, hub id, or tiny:NAME.

Weights are never silently re-initialised: missing or unexpected keys at load are errors.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from archtune.errors import Problem, UserError
from archtune.plan import Plan, resolve
from archtune.plan.structure import TORCHVISION_INSTALL

TINY_PREFIX = "tiny:"


def tiny_name(base_model: str) -> str | None:
    return base_model[len(TINY_PREFIX):] if base_model.startswith(TINY_PREFIX) else None


def _unknown_tiny(name: str) -> UserError:
    from archtune.families import tiny_names

    return UserError.single("base_model", f"no embedded tiny model named {name!r}",
                            f"use one of: {', '.join('tiny:' + n for n in tiny_names())}")


def read_model_config(cfg) -> dict[str, Any]:
    """config.json of the base model as a dict, without touching weights, with the config's
    `model_config` overrides (Axolotl's overrides_of_model_config) set on its top-level keys."""
    return {**_config_json(cfg), **(cfg.overrides_of_model_config or {})}


def _config_json(cfg) -> dict[str, Any]:
    name = tiny_name(cfg.base_model)
    if name is not None:
        from archtune.families import find_tiny

        try:
            _, tiny = find_tiny(name)
        except KeyError:
            raise _unknown_tiny(name) from None
        return tiny.build_config(load_tokenizer(cfg)).to_dict()
    source = cfg.base_model_config or cfg.base_model
    path = Path(source)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UserError.single("base_model", f"{path} has no config.json", "point base_model at a model directory")
        return json.loads(config_file.read_text())
    if path.exists() or source.startswith((".", "/")) or source.count("/") != 1:
        raise UserError.single("base_model", f"{source!r} is neither a model directory nor a hub id",
                               "give a local model directory, a hub id (org/name) or tiny:NAME")
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(source, "config.json", revision=cfg.model_revision)
    except Exception as exc:  # network or missing repo: a user problem, not a crash
        raise UserError.single("base_model", f"cannot fetch config.json of hub model {source!r}: {exc.__class__.__name__}",
                               "check the id and your network, or download the model and give its directory") from None
    return json.loads(Path(file).read_text())


def resolve_plan(cfg, world_size: int = 1) -> Plan:
    """The Plan for `cfg` as for `world_size` processes, from config.json alone (no weights).

    `archtune check` and `archtune train` both resolve through here, so they accept and refuse the
    same configurations. Problems stay in `plan.errors` (nothing is raised for them).
    """
    plan = resolve(cfg, read_model_config(cfg), world_size=world_size)
    if cfg.eot_tokens:  # a property of the tokenizer, which config.json does not describe
        problem = eot_token_problem(load_tokenizer(cfg), cfg.eot_tokens)
        if problem:
            plan.error("eot_tokens", *problem)
    return plan


def eot_token_problem(tokenizer, tokens: list[str] | None) -> tuple[str, str] | None:
    """(message, fix) when one of `eot_tokens` is not exactly one token of the tokenizer (Axolotl's rule)."""
    bad = [t for t in tokens or () if len(tokenizer(t, add_special_tokens=False)["input_ids"]) != 1]
    if not bad:
        return None
    return (f"not a single token of this tokenizer: {', '.join(map(repr, bad))}",
            "list the tokenizer's own end-of-turn tokens (e.g. <end_of_turn>, <|im_end|>), or remove eot_tokens")


def load_tokenizer(cfg):
    name = tiny_name(cfg.base_model)
    if name is not None and cfg.tokenizer_config is None:
        from archtune.assets import load_tokenizer as archtune_tokenizer

        tok = archtune_tokenizer()
    else:
        source = cfg.tokenizer_config or cfg.base_model
        try:
            tok = _tokenizer_class(cfg).from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UserError.single("tokenizer_config" if cfg.tokenizer_config else "base_model",
                                   f"cannot load a tokenizer from {source!r}: {exc}",
                                   "point tokenizer_config at a directory with tokenizer files") from None
    if cfg.special_tokens:
        tok.add_special_tokens(dict(cfg.special_tokens))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def set_chat_template(tokenizer, plan: Plan):
    """The plan's chat template (`plan.chat_template`: a built-in name's Jinja text, or the template as
    written) on the tokenizer, which saves it with the weights; None leaves the tokenizer's own."""
    if plan.chat_template is not None:
        tokenizer.chat_template = plan.chat_template
    return tokenizer


def _tokenizer_class(cfg):
    """`tokenizer_type` (a transformers tokenizer class name), else AutoTokenizer. `processor_type`
    names the processor of a multimodal model; archtune trains text, so its tokenizer loads."""
    import transformers

    name = cfg.tokenizer_type or "AutoTokenizer"
    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise UserError.single("tokenizer_type", f"transformers has no tokenizer class {name!r}",
                               "use AutoTokenizer (or remove tokenizer_type)")
    return cls


def torch_dtype(plan: Plan) -> torch.dtype:
    """bf16 weights when the run is bf16 (`bf16: true`, or `auto` resolved to true by the Plan)."""
    return torch.bfloat16 if plan.training.bf16 else torch.float32


def autocast_dtype(plan: Plan) -> torch.dtype | None:
    """The 16-bit dtype a bf16/fp16 run computes in under autocast; None for a float32 run."""
    return torch.bfloat16 if plan.training.bf16 else torch.float16 if plan.training.fp16 else None


def load_processor(plan: Plan):
    """(processor, None) for a model that trains on images or audio, else (None, why not).

    The processor comes from `processor_type` (a transformers class name, e.g. AutoProcessor)
    or the model's own files; a tiny model builds its own. Nothing is loaded for a family
    without modalities or a config without towers. Where the whole processor does not load, it
    loads without the parts of `Family.torchvision_processor_parts` (media_gaps says which rows
    that leaves out, and why).
    """
    family = plan.family
    if not family.modalities:
        return None, f"this model ({plan.model_type or family.name}) trains on text only in archtune"
    if not family.has_towers(plan.model_config):
        return None, "the model's config.json declares no vision or audio tower"
    m = plan.model
    name = tiny_name(m.base_model)
    if name is not None:  # a tiny model builds its own processor (processor_type names the class it is)
        from archtune.models.tiny import build_tiny_processor

        processor = build_tiny_processor(name)
        return (processor, None) if processor is not None else (None, f"tiny:{name} has no processor")
    import transformers

    cls_name = m.processor_type or "AutoProcessor"
    cls = getattr(transformers, cls_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise UserError.single("processor_type", f"transformers has no processor class {cls_name!r}",
                               "use AutoProcessor or the model's processor class (e.g. what processor_config.json names)")
    source = m.tokenizer_config or m.base_model
    try:
        processor = cls.from_pretrained(source, trust_remote_code=m.trust_remote_code)
    except Exception as exc:  # no processor files, a class that does not match them, no torchvision
        processor = _without_parts(cls, source, m.trust_remote_code, family.torchvision_processor_parts)
        if processor is None:
            why = f"{type(exc).__name__}: {str(exc).strip()}"
            if "torchvision" in why.lower():
                why += f" (to use it, {TORCHVISION_INSTALL})"
            if m.processor_type:
                raise UserError.single("processor_type", f"cannot load {cls_name} from {source}: {why}",
                                       "use AutoProcessor, or the class the model's processor_config.json names"
                                       ) from None
            return None, f"no processor could be loaded from {source} ({why})"
    if not _reads_media(processor, family.modalities_of(plan.model_config)):
        return None, f"the processor loaded from {source} ({type(processor).__name__}) has no image processor"
    return processor, None


def _reads_media(processor, modalities: tuple[str, ...]) -> bool:
    """Whether the processor has the part of at least one of the model's modalities."""
    from archtune.families.media import PROCESSOR_PARTS

    return any(getattr(processor, PROCESSOR_PARTS[m], None) is not None for m in modalities if m in PROCESSOR_PARTS)


def media_gaps(plan: Plan, processor) -> dict[str, str]:
    """{modality: why its rows are refused} for the model's modalities the loaded processor has no
    part for (e.g. Gemma 4 Unified's images where torchvision is missing: its image processor has
    only a torchvision backend)."""
    import importlib.util

    from archtune.families.media import PROCESSOR_PARTS

    gaps = {}
    for modality in plan.family.modalities_of(plan.model_config):
        part = PROCESSOR_PARTS.get(modality)
        if part is None or getattr(processor, part, None) is not None:
            continue
        why = f"the processor archtune loaded for this model has no {part.replace('_', ' ')}"
        if part in plan.family.torchvision_processor_parts and importlib.util.find_spec("torchvision") is None:
            why = (f"this model's {part.replace('_', ' ')} needs torchvision, which is not installed "
                   f"(to use it, {TORCHVISION_INSTALL})")
        gaps[modality] = why
    return gaps


def processor_problems(plan: Plan) -> None:
    """What train meets when it loads the processor for rows with images or audio, recorded on the Plan
    for `archtune check` (the same load_processor): the error train stops with (a `processor_type`
    that does not load), or a warning that such rows will be refused, and why (e.g. torchvision missing)."""
    asked = bool(plan.model.processor_type)  # Axolotl loads a processor only when processor_type is set
    if plan.preference.trainer or not (asked or plan.family.modalities and plan.family.has_towers(plan.model_config)):
        return  # TRL's trainers and text-only models read no processor
    try:
        processor, why = load_processor(plan)
    except UserError as exc:
        plan.errors.extend(exc.problems)
        return
    if processor is None:
        plan.warn(f"rows with images or audio will be refused: {why}")
        return
    for modality, why in media_gaps(plan, processor).items():
        plan.warn(f"rows with {modality} content will be refused: {why}")


def _without_parts(cls, source, trust_remote_code: bool, parts: tuple[str, ...]):
    """The processor at `source` without its `parts` (families.media.without_parts; the video part
    through without_video_processor), or None when it has none of them or does not load that way
    either. Video processors need torchvision; most image processors (Pillow) and audio (numpy) do not."""
    import transformers
    from transformers import ProcessorMixin

    from archtune.families import media

    try:
        if not isinstance(cls, type) or not issubclass(cls, ProcessorMixin):  # AutoProcessor: the class saved
            cls = getattr(transformers, processor_class_name(source) or "", None)
        absent = tuple(p for p in parts if cls is not None and p in cls.get_attributes())
        if not absent:
            return None
        without = media.without_video_processor(cls) if absent == ("video_processor",) else media.without_parts(cls, absent)
        return without.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception:  # the caller reports the first failure
        return None


def processor_class_name(source) -> str | None:
    """The processor class AutoProcessor builds for `source`, found where AutoProcessor looks: the
    `processor_class` of processor_config.json, preprocessor_config.json, video_preprocessor_config.json
    or tokenizer_config.json (checkpoints such as Qwen 3.5's name it in the preprocessor files only),
    else transformers' processor for config.json's model_type."""
    from transformers import AutoConfig, ProcessorMixin
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.tokenization_auto import get_tokenizer_config
    from transformers.video_processing_utils import BaseVideoProcessor

    readers = (lambda: ProcessorMixin.get_processor_dict(source)[0],
               lambda: ImageProcessingMixin.get_image_processor_dict(source)[0],
               lambda: BaseVideoProcessor.get_video_processor_dict(source)[0],
               lambda: get_tokenizer_config(source))
    for read in readers:
        try:
            name = read().get("processor_class")
        except Exception:  # that file is absent or unreadable: look in the next one, as AutoProcessor does
            continue
        if name:
            return name
    try:
        return PROCESSOR_MAPPING_NAMES.get(AutoConfig.from_pretrained(source).model_type)
    except Exception:
        return None


def set_attn_implementation(model, plan: Plan) -> None:
    """The attention the Plan chose, when the config asked for one (else transformers' default,
    sdpa where the model supports it). A multimodal model whose towers lack the kernel gets it in
    its language model (text_config) only: the towers are not run on text batches."""
    impl = plan.model.attn_implementation
    if not impl or not plan.model.attn_implementation_user_set or not hasattr(model, "set_attn_implementation"):
        return
    try:
        model.set_attn_implementation(impl)
    except ValueError as exc:
        if getattr(model.config, "text_config", None) is None:
            raise UserError.single("attn_implementation", f"{impl} does not run on this model: {exc}",
                                   "use attn_implementation: sdpa or eager") from None
        model.set_attn_implementation({"text_config": impl})


def auto_model_class(plan: Plan):
    import transformers

    return getattr(transformers, plan.auto_class)


# A head the Plan adds to the base model (a reward model's score): absent from the checkpoint by design;
# and the head it replaces (the language-model head of a checkpoint with untied embeddings): dropped by design.
_NEW_HEAD_PREFIXES = {"AutoModelForSequenceClassification": ("score.",)}
_REPLACED_HEAD_PREFIXES = {"AutoModelForSequenceClassification": ("lm_head.",)}


def _head_settings(plan: Plan) -> dict:
    """Config values of the head the Plan adds (a reward model's one-output score)."""
    return {"num_labels": plan.model.num_labels} if plan.model.auto_class else {}


def _config_updates(plan: Plan) -> dict:
    """Values set on the base model's config: the `model_config` overrides, then the head's."""
    return {**plan.model.model_config_overrides, **_head_settings(plan)}


def pretrained_kwargs(plan: Plan) -> dict:
    """from_pretrained arguments for the base model: `model_kwargs` (Axolotl's overrides_of_model_kwargs;
    the plan refuses the ones archtune sets itself), and the config updates: as keyword arguments
    (transformers sets them on the config), or, with `model_config` overrides (which may name keys
    the config class does not declare), on a config object built here, as Axolotl does."""
    m = plan.model
    kwargs = dict(m.model_kwargs_overrides)
    updates = _config_updates(plan)
    if not m.model_config_overrides:
        return {**kwargs, **updates}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(m.base_model_config or m.base_model, trust_remote_code=m.trust_remote_code,
                                        revision=m.revision)
    for key, value in updates.items():
        setattr(config, key, value)
    return {**kwargs, "config": config}


def pretrained_config(plan: Plan, source: str) -> tuple[Any, dict]:
    """(the config object, the other from_pretrained arguments) of `pretrained_kwargs`, for loading
    from a state dict: the config updates are set on a config built here (transformers takes no
    config keyword arguments without a model path)."""
    kwargs = pretrained_kwargs(plan)
    config = kwargs.pop("config", None)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(plan.model.base_model_config or source,
                                            trust_remote_code=plan.model.trust_remote_code)
        for key in _config_updates(plan):
            setattr(config, key, kwargs.pop(key))
    return config, kwargs


def _drop_new_head(info: dict, plan: Plan) -> dict:
    auto = plan.model.auto_class or ""
    prefixes = _NEW_HEAD_PREFIXES.get(auto, ())
    if not prefixes:
        return info
    replaced = _REPLACED_HEAD_PREFIXES.get(auto, ())
    return {**info, "missing_keys": [k for k in info.get("missing_keys", []) if not k.startswith(prefixes)],
            "unexpected_keys": [k for k in info.get("unexpected_keys", []) if not k.startswith(replaced)]}


def load_model(plan: Plan, tokenizer, *, path: str | os.PathLike | None = None):
    """The model to train (base weights), in the dtype the config asks for.

    `path` loads full weights from another directory (e.g. a full fine-tune's output_dir).
    """
    from archtune.models.heads import register_score_head

    register_score_head(plan)  # a reward model's score head transformers lacks for this family
    m = plan.model
    dtype = torch_dtype(plan)
    name = tiny_name(m.base_model) if path is None else None
    if name is not None:
        from archtune.models.tiny import build_tiny_model

        try:
            model, _ = build_tiny_model(name, seed=plan.training.seed, auto_class=m.auto_class,
                                        **_config_updates(plan))
        except KeyError:
            raise _unknown_tiny(name) from None
        return _with_score_pad(model.to(dtype), plan, tokenizer)
    source = str(path or m.base_model)
    key = "base_model" if path is None else "output_dir"
    try:
        # Weights the checkpoint lacks by design (a reward model's new score head) are drawn from
        # `seed`, not from whatever the process's random state is.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(plan.training.seed)
            by_tensor = checkpoint_to_cast(plan, dtype) if path is None else None
            if by_tensor is not None:
                return _with_score_pad(_load_by_tensor(plan, by_tensor, dtype), plan, tokenizer)
            model, info = auto_model_class(plan).from_pretrained(
                source, dtype=dtype, trust_remote_code=m.trust_remote_code, revision=m.revision,
                output_loading_info=True, **(pretrained_kwargs(plan) if path is None else _head_settings(plan)))
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        # transformers printed a load report naming the tensors; it would re-initialise them.
        raise UserError.single(key, f"{source}: weight shapes differ from the ones config.json describes "
                               "(MISMATCH rows in the load report above); those tensors would be re-initialised",
                               "use the config.json that belongs to these weights") from None
    except OSError as exc:  # no weights file, unreadable safetensors
        raise UserError.single(key, f"cannot load weights from {source}: {exc}",
                               "point it at a directory written by save_pretrained (config.json + *.safetensors)") from None
    check_loading_info(_drop_new_head(info, plan) if path is None else info, source, key)
    return _with_score_pad(model, plan, tokenizer)


def load_from_state_dict(plan: Plan, state: dict, kwargs: dict):
    """`from_pretrained(None, config=..., state_dict=state)` for the base checkpoint directory, named and
    configured as a load from the directory would be (its generation_config, `_name_or_path`); loading
    problems raise as in `load_model`. `state` may hold lazy safetensors slices and zero-byte stand-ins."""
    import transformers
    from transformers import GenerationConfig

    # The class the Auto class picks (the meta-device build's): an Auto class needs a model path.
    model_class = getattr(transformers, plan.structure().model_class)
    source = str(plan.model.base_model)
    config, extra = pretrained_config(plan, source)
    model, info = model_class.from_pretrained(None, config=config, state_dict=state, **kwargs, **extra)
    check_loading_info(info, source)
    model.config._name_or_path = source  # as a load from the directory names it (adapter_config reads it)
    if (Path(source) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source)
    return model


def checkpoint_to_cast(plan: Plan, dtype: torch.dtype):
    """The base checkpoint as a `CheckpointExperts` without expert tensors, to be read one tensor at a
    time, when some of its tensors are stored in another dtype than `dtype`; None where from_pretrained
    reads it itself: a hub id, a reward model's head, remote code, or tensors stored in `dtype` (then
    transformers' tensors are the mapped file's pages themselves: one copy)."""
    from safetensors import safe_open

    from archtune.models.checkpoint_experts import CheckpointExperts, weight_map

    directory = readable_checkpoint(plan)
    files = weight_map(directory) if directory is not None else None
    if files is None:
        return None
    stored = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for file in sorted(set(files.values())):
        with safe_open(str(directory / file), framework="pt", backend="pread") as handle:
            if any(stored.get(handle.get_slice(k).get_dtype(), dtype) != dtype for k in handle.keys()):
                return CheckpointExperts(directory, files, {})
    return None


def readable_checkpoint(plan: Plan) -> Path | None:
    """The base model's local directory when archtune may read its tensors itself and hand them to
    `load_from_state_dict`: not a tiny model or hub id, no head the Plan adds (a reward model's), and
    a model class transformers has (not remote code)."""
    import transformers

    base = plan.model.base_model
    structure = plan.structure()
    if tiny_name(base) is not None or not Path(base).is_dir() or plan.model.auto_class or structure is None \
            or not hasattr(transformers, structure.model_class):
        return None
    return Path(base)


def _load_by_tensor(plan: Plan, checkpoint, dtype: torch.dtype):
    """The base model from its safetensors shards read one tensor at a time (pread, nothing mapped)
    and cast: from_pretrained maps the shards, and a mapped page it has read stays resident until the
    load ends, so a checkpoint cast to another dtype was held twice (the file's pages and the weights)."""
    state, handles = checkpoint.state_dict("cpu", dtype)
    try:
        return load_from_state_dict(plan, state, dict(dtype=dtype, output_loading_info=True))
    finally:
        del state
        for handle in handles:
            handle.__exit__(None, None, None)


def _with_score_pad(model, plan: Plan, tokenizer):
    """A score head reads each sequence's score at its last non-padding token, found through the
    config's pad_token_id: a checkpoint without one gets the tokenizer's (as TRL's RewardTrainer sets
    it for training), so the saved and merged models score padded batches too."""
    text = model.config.get_text_config()
    if plan.model.auto_class and getattr(text, "pad_token_id", None) is None and tokenizer is not None:
        text.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model


# What each kind of loading-info key means for the run.
_LOAD_PROBLEMS = {
    "missing_keys": ("missing", "not in the checkpoint: transformers would silently re-initialise them with random values"),
    "unexpected_keys": ("unexpected", "in the checkpoint but not in the model: these weights would be silently dropped"),
    "mismatched_keys": ("mismatched", "of another shape in the checkpoint: they would be re-initialised"),
    "error_msgs": ("load error", "reported while loading the state dict"),
}


def check_loading_info(info: dict, source: str, key: str = "base_model") -> None:
    """Raise one UserError listing every missing / unexpected / mismatched weight key of a load.

    `info` is what `from_pretrained(..., output_loading_info=True)` returns. A weight is never
    silently re-initialised or dropped: either the checkpoint matches the model, or the run stops.
    """
    problems = []
    for field, (kind, meaning) in _LOAD_PROBLEMS.items():
        entries = sorted(str(e if not isinstance(e, tuple) else e[0]) for e in (info.get(field) or ()))
        if not entries:
            continue
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        problems.append(Problem(key, f"{source}: {len(entries)} {kind} weight key(s) ({shown}) - {meaning}",
                                "use the config.json that belongs to these weights (model_type, layer counts, "
                                "sizes), or a complete, uncorrupted checkpoint"))
    if problems:
        raise UserError(problems)


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def apply_weight_scale_rules(model, plan: Plan, console=None):
    """Run the Plan's `normalize_weight_scales` rules on the base weights, in place.

    Call it right after `load_model`, before adapters are attached (and before any sharding):
    every rank loads the same weights and computes the same result, so every rank does this and
    ends with the same weights; only rank 0 prints the table (tensor, std, ratio, action) and the
    warnings. Returns the `WeightScaleResult`, or None when the Plan has no rules.
    """
    rules = plan.model.normalize_weight_scales
    if not rules:
        return None
    from rich.markup import escape

    from archtune.models.weight_scales import normalize_weight_scales, render_table

    result = normalize_weight_scales(model, rules)
    if console is not None and _is_rank0():
        console.print(render_table(result, title="normalize_weight_scales (base weights, before adapters)"))
        for warning in result.warnings:
            console.print(f"[yellow]warning:[/] normalize_weight_scales: {escape(warning)}")
    return result


def trained_weights_kind(output_dir: str | os.PathLike) -> str | None:
    """'adapter', 'full' or None: what a finished run left in output_dir.

    train_summary.json says which kind the last run wrote, so an earlier run's files of the other
    kind in the same directory are never picked up by mistake.
    """
    out = Path(output_dir)
    has_adapter = (out / "adapter_config.json").is_file()
    has_full = (out / "config.json").is_file() and any(out.glob("model*.safetensors"))
    summary = out / "train_summary.json"
    if summary.is_file():
        try:
            adapter = json.loads(summary.read_text()).get("adapter", "missing")
        except (OSError, ValueError):
            adapter = "missing"
        if adapter != "missing":
            kind = "adapter" if adapter else "full"
            if (kind == "adapter" and has_adapter) or (kind == "full" and has_full):
                return kind
    if has_adapter:
        return "adapter"
    return "full" if has_full else None
