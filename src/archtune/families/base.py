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
class TinyModel:
    """An embedded tiny random model (`base_model: tiny:NAME`), shaped like a real one.

    `build_config(tokenizer)` returns the transformers config; sizes are tiny, vocabulary and
    special token ids come from archtune's own tokenizer.
    """

    name: str
    description: str
    build_config: Callable[["PreTrainedTokenizerBase"], "PretrainedConfig"]


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
    tiny_models: tuple[TinyModel, ...] = ()
    # Rules and patches (filled by the family-quirks work; see plan.py).
    rules: list[Any] = field(default_factory=list)
    patches: list[Any] = field(default_factory=list)

    def tiny(self, name: str) -> TinyModel | None:
        return next((t for t in self.tiny_models if t.name == name), None)
