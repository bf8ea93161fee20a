"""What a model family declares: data plus small hooks.

Model knowledge lives in families/ and nowhere else: no other module names a family or
compares a model_type. A family file builds one `Family` and calls `register_family`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


@dataclass(frozen=True)
class FamilyRule:
    """A rule a family asks for by name: one of the rule builders of plan/rules.py
    (`FAMILY_RULE_BUILDERS`), given the family's reason when the builder takes one.

    The family declares; the plan builds and runs the rule (`plan.rules.family_rules`).
    """

    name: str
    why: str = ""


def text_config(model_config: dict[str, Any]) -> dict[str, Any]:
    """The text model's part of a config.json dict: its `text_config`, or the config itself."""
    text = model_config.get("text_config")
    return text if isinstance(text, dict) else model_config


@dataclass(frozen=True)
class TinyModel:
    """An embedded tiny random model (`base_model: tiny:NAME`), shaped like a real one.

    `build_config(tokenizer)` returns the transformers config; sizes are tiny, vocabulary and
    special token ids come from archtune's own tokenizer.
    """

    name: str
    description: str
    build_config: Callable[["PreTrainedTokenizerBase"], "PretrainedConfig"]
    # The model's processor (image processor at the tiny image size, tokenizer, chat template
    # that renders media placeholders), built from the tiny config; None: text only.
    build_processor: Callable[["PretrainedConfig"], Any] | None = None


@dataclass(frozen=True)
class GgufArch:
    """How the family's text model is written as GGUF (llama.cpp's format), beyond what every
    family shares (archtune.export's writer: the common hyperparameters, the tokenizer, the
    tensor names of the `gguf` package's map).

    `arch` is llama.cpp's architecture name. `tensors(name, tensor, text_config)` turns one
    tensor of the text model (named as a stand-alone text model names it: `model.layers.N...`,
    `lm_head.weight`) into the tensors llama.cpp reads, still under Hugging Face names the
    `gguf` package maps (e.g. a norm offset folded in, a fused tensor split); [] drops it.
    `metadata(writer, text_config)` adds the architecture's own keys with the `gguf` package's
    GGUFWriter methods; a key it writes replaces the shared writer's value. `keep_f32` are
    regexes (search, over llama.cpp's names) of more tensors llama.cpp reads as float32.
    `extra_tensors(text_config)` returns tensors the architecture reads that the model has no
    parameter for (already under llama.cpp's names, e.g. RoPE frequency factors).
    `rope_types` are RoPE types (Hugging Face's `rope_type`) beyond default and linear that the
    family's own keys and tensors encode.
    `sentencepiece_model` is the tokenizer model llama.cpp's converter writes for the family's
    SentencePiece-style tokenizers (`▁` for spaces, byte fallback): "llama" (pieces with scores) or
    "gemma4" (pieces with merges); `visible_tokens` are special tokens that converter marks
    USER_DEFINED, so that llama.cpp prints them (a chat parser reads them) instead of hiding them.
    """

    arch: str
    tensors: Callable[[str, Any, dict[str, Any]], Any] | None = None
    metadata: Callable[[Any, dict[str, Any]], None] | None = None
    keep_f32: tuple[str, ...] = ()
    extra_tensors: Callable[[dict[str, Any]], Any] | None = None
    rope_types: tuple[str, ...] = ()
    sentencepiece_model: str = "llama"
    visible_tokens: tuple[str, ...] = ()


# Special tokens every tiny config may point its multimodal ids at (archtune's tokenizer has them all).
SPECIAL_TOKENS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
    "<image_soft_token>", "<audio_soft_token>", "<video_soft_token>",
    "<start_of_image>", "<end_of_image>", "<start_of_audio>", "<end_of_audio>",
    "<vision_start>", "<vision_end>",
)


@dataclass(frozen=True)
class TokenIds:
    """Vocabulary size and special token ids of a tokenizer, for tiny configs.

    `ids["<image_soft_token>"]` raises KeyError when the tokenizer lacks the token (instead of
    silently mapping it to `<unk>` as `convert_tokens_to_ids` does).
    """

    vocab_size: int
    pad: int
    bos: int
    eos: int
    by_token: dict[str, int]

    def __getitem__(self, token: str) -> int:
        try:
            return self.by_token[token]
        except KeyError:
            raise KeyError(f"the tokenizer has no special token {token!r}") from None


def special_token_ids(tokenizer: "PreTrainedTokenizerBase") -> TokenIds:
    vocab = tokenizer.get_vocab()
    by_token = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS if tok in vocab}

    def required(attr: str, fallback: str) -> int:
        value = getattr(tokenizer, attr)
        if value is None:
            value = by_token.get(fallback)
        if value is None:
            raise KeyError(f"the tokenizer has no {attr.removesuffix('_id')} ({fallback})")
        return int(value)

    return TokenIds(
        vocab_size=len(tokenizer),
        pad=required("pad_token_id", "<pad>"),
        bos=required("bos_token_id", "<bos>"),
        eos=required("eos_token_id", "<eos>"),
        by_token=by_token,
    )



@dataclass
class Family:
    name: str
    model_types: tuple[str, ...]
    description: str = ""
    # Auto class that loads the full model for training (e.g. the multimodal wrapper).
    auto_class: str = "AutoModelForCausalLM"
    # Dotted path of the language model inside the loaded model ("" = the model itself).
    language_model_prefix: str = ""
    # Class name of the text decoder layer (FSDP2 wrap class, activation checkpointing).
    decoder_layer_cls: str | None = None
    # Module name prefixes of multimodal towers / embedders / projectors (to freeze).
    mm_module_prefixes: tuple[str, ...] = ()
    # Default LoRA target regex (full match) when the user gives no targets.
    lora_target_regex: str | None = None
    # Expert parameter names (e.g. experts.gate_up_proj) for lora_target_parameters.
    expert_param_names: tuple[str, ...] = ()
    # Packing policy: drop the attention mask and rely on position_ids.
    packing_drop_attention_mask: bool = False
    # PEFT cannot wrap some custom linear wrappers: {wrapper class name: attribute of the inner
    # nn.Linear}. LoRA aimed at such a wrapper lands on its inner linear instead.
    lora_target_redirects: dict[str, str] = field(default_factory=dict)
    # Short names accepted in lora_target_parameters -> the expert parameter they mean
    # (e.g. gate_proj -> experts.gate_up_proj, where gate and up are fused in one tensor).
    expert_param_aliases: dict[str, str] = field(default_factory=dict)
    # How a checkpoint that stores each expert as its own module (`experts.<e>.<part>.weight`, the
    # hub layout transformers fuses at load) makes up an expert tensor: {expert param name: parts,
    # concatenated along the output dimension}. A checkpoint holding the fused [E, out, in] tensor
    # under the parameter's own name needs none. Lets 4-bit experts be read one expert at a time.
    expert_checkpoint_parts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Hook: does this config.json (as a dict) describe a mixture-of-experts model? None: never.
    is_moe: Callable[[dict[str, Any]], bool] | None = None
    # Media the model trains on when its processor and towers are there ("image", "audio").
    # A row carrying another kind of media is refused, never trained as text.
    modalities: tuple[str, ...] = ()
    # The projectors/embedders among mm_module_prefixes (vision/audio features -> text hidden
    # size). Frozen with the towers by default; `lora_modules_to_save` or `unfrozen_parameters`
    # naming them trains them fully.
    mm_projector_prefixes: tuple[str, ...] = ()
    # Text-config keys of the experts' shape: {"num_experts", "top_k", "hidden", "intermediate"}
    # -> the key naming it in this family's config.json (the experts implementation rule reads them).
    moe_shape_keys: dict[str, str] = field(default_factory=dict)
    # Dotted path of the family's PreTrainedModel class, for a family transformers gives no
    # *ForSequenceClassification class: a reward model's score head is then built on it as
    # transformers builds its siblings' (GenericForSequenceClassification + e.g. Gemma3PreTrainedModel).
    sequence_classification_base: str = ""
    # Keys of config.json whose (non-empty) sub-config means the model has that tower.
    tower_config_keys: tuple[str, ...] = ("vision_config", "audio_config")
    # The tower each modality needs: {modality: key of config.json}; a modality whose key is
    # absent or empty in a model's config is not trained on that model (e.g. audio on Gemma 4 31B).
    modality_config_keys: dict[str, str] = field(default_factory=lambda: {"image": "vision_config",
                                                                          "audio": "audio_config"})
    # Processor parts (transformers' attribute names) whose classes have only a torchvision backend:
    # where the whole processor does not load, it loads without them, and rows of the modality such
    # a part reads are refused with the install line (video processors need torchvision everywhere).
    torchvision_processor_parts: tuple[str, ...] = ("video_processor",)
    # Documentation data (rendered by `archtune docs`): real checkpoints, architecture notes,
    # measured figures and recommendations, known issues (symptom, cause, fix), recommended
    # normalize_weight_scales rules.
    models: dict[str, str] = field(default_factory=dict)
    architecture_notes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    known_issues: tuple[tuple[str, str, str], ...] = ()
    weight_scale_rules: tuple[dict, ...] = ()
    tiny_models: tuple[TinyModel, ...] = ()
    # The family's own decisions (names of rule builders in plan/rules.py), run after the
    # generic rules, in this order.
    rules: list[FamilyRule] = field(default_factory=list)
    # Names of the patches (archtune.patches) the family's model needs, e.g. for packing.
    patches: list[str] = field(default_factory=list)
    # GGUF export (`archtune export --format gguf`): the text config's model_type -> how it is
    # written; a model_type not listed has no GGUF writer here.
    gguf: dict[str, GgufArch] = field(default_factory=dict)
    # What serving engines are known to do with this family's expert-LoRA adapters (said by
    # `export --format adapter` for an adapter with 3D expert tensors).
    serving_notes: tuple[str, ...] = ()
    # `chat_template:` names (as Axolotl users write them) -> archtune's Jinja text of this
    # family's turn format.
    chat_templates: dict[str, str] = field(default_factory=dict)

    def tiny(self, name: str) -> TinyModel | None:
        return next((t for t in self.tiny_models if t.name == name), None)

    def has_towers(self, model_config: dict[str, Any]) -> bool:
        """True when this family has multimodal towers and the config declares at least one."""
        return bool(self.mm_module_prefixes) and any(
            isinstance(model_config.get(k), dict) and bool(model_config.get(k)) for k in self.tower_config_keys)

    def modalities_of(self, model_config: dict[str, Any]) -> tuple[str, ...]:
        """The family's modalities this model has a tower for."""
        return tuple(m for m in self.modalities
                     if isinstance(model_config.get(self.modality_config_keys.get(m, "")), dict)
                     and bool(model_config.get(self.modality_config_keys[m])))

    def moe(self, model_config: dict[str, Any]) -> bool:
        """True when the config describes a mixture-of-experts model (the family's `is_moe` hook)."""
        return bool(self.is_moe(model_config)) if self.is_moe is not None else False

    def moe_shape(self, model_config: dict[str, Any]) -> dict[str, int] | None:
        """{"num_experts", "top_k", "hidden", "intermediate"} of an MoE config, or None when
        the model has no experts or the family does not declare where they are."""
        if not self.moe(model_config) or not self.moe_shape_keys:
            return None
        text = text_config(model_config)
        shape = {name: text.get(key) for name, key in self.moe_shape_keys.items()}
        if not all(isinstance(v, int) and v > 0 for v in shape.values()):
            return None
        return shape
