"""The Plan: every resolved setting with its value, source and reason.

Only `resolve` makes decisions. The generic rules (plan/rules.py: GENERIC_RULES, driven by
each family's data, written by concern in plan/*_rules.py) run first, then the family's own rules (`Family.rules`), then the refusals
of what this release cannot train (REFUSALS); nothing else decides, and `archtune check` and
`archtune train` refuse exactly the same configurations. Later stages read the Plan and never look at the model's type again.
`archtune check` prints it.

Settings are flat, nested keys dotted: `gradient_checkpointing_kwargs.use_reentrant`,
`fsdp_config.fsdp_transformer_layer_cls_to_wrap`. `plan.section("fsdp_config")` gives a nested
key back as a dict.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from archtune.config.schema import Config
from archtune.errors import Problem, UserError
from archtune.families import Family, detect, model_types_of
from archtune.plan.data_settings import DataSettings, chat_template_text, data_settings
from archtune.plan.rules import GENERIC_RULES, LAYER_CLASSES_KEY, REFUSALS, family_rules
from archtune.plan.shared import Rule
from archtune.plan.train_settings import TrainSettings, train_settings
from archtune.plan.stage_settings import (AdapterSettings, DistributedSettings, ExportDefaults, GrpoSettings,
                                          ModelSettings, PreferenceSettings, adapter_settings, distributed_settings,
                                          export_defaults, grpo_settings, model_settings, preference_settings)
from archtune.plan.structure import ModelStructure, StructureUnavailable, model_structure

Source = Literal["user", "default", "family", "auto"]
SOURCES: tuple[str, ...] = ("user", "default", "family", "auto")

__all__ = ["Decision", "Plan", "Rule", "Source", "ModelStructure", "StructureUnavailable", "model_structure",
           "resolve"]


@dataclass
class Decision:
    value: Any
    source: Source
    reason: str = ""

    def to_dict(self) -> dict:
        return {"value": self.value, "source": self.source, "reason": self.reason}


# ---------------------------------------------------------------- the plan

@dataclass
class Plan:
    config: Config
    family: Family
    model_type: str
    model_config: dict
    world_size: int = 1
    settings: dict[str, Decision] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    info: list[str] = field(default_factory=list)  # facts worth one line (e.g. a key with no effect here)

    # -- reading
    def get(self, key: str, default: Any = None) -> Any:
        d = self.settings.get(key)
        return default if d is None else d.value

    def source(self, key: str) -> Source | None:
        d = self.settings.get(key)
        return None if d is None else d.source

    def user_set(self, key: str) -> bool:
        return self.source(key) == "user"

    def section(self, prefix: str) -> Any:
        """A dotted group of settings as a nested dict: section("fsdp_config") ->
        {"fsdp_version": 2, ...}; the value itself when `prefix` is a plain key; None when unset."""
        if prefix in self.settings:
            return self.get(prefix)
        start = prefix + "."
        out: dict[str, Any] = {}
        for key, decision in self.settings.items():
            if key.startswith(start):
                node = out
                *parents, leaf = key[len(start):].split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = decision.value
        return out or None

    # -- typed views: what later stages read. Each is a decision some rule makes for every model,
    # so a missing one is a bug in the plan's rules, never a reason for a stage to guess.
    def decided(self, key: str) -> Any:
        """The value of a setting every plan must hold; KeyError naming the key when no rule set it."""
        if key not in self.settings:
            raise KeyError(f"the plan has no decision for {key!r}: a rule of src/archtune/plan/ (listed in rules.py) must set it")
        return self.settings[key].value

    @property
    def use_cache(self) -> bool:
        return bool(self.decided("use_cache"))

    @property
    def freeze_mm_modules(self) -> bool:
        return bool(self.decided("freeze_mm_modules"))

    @property
    def frozen_prefixes(self) -> tuple[str, ...]:
        """Module prefixes of the multimodal towers that stay frozen (empty when freezing is off)."""
        return tuple(self.family.mm_module_prefixes) if self.freeze_mm_modules else ()

    @property
    def decoder_layer_classes(self) -> tuple[str, ...]:
        """Class names of the text decoder layers (FSDP2 units, activation checkpointing/offloading)."""
        return tuple(self.decided(LAYER_CLASSES_KEY) or ())

    @property
    def drop_attention_mask(self) -> bool:
        """Packed batches carry no attention mask (documents are told apart by position_ids)."""
        return bool(self.decided("sample_packing_drop_attention_mask"))

    @property
    def chat_template(self) -> str | None:
        """The chat template the tokenizer renders with and is saved with: the Jinja text of a built-in
        name (chatml, gemma3, ...) or the template as written; None keeps the tokenizer's own."""
        return chat_template_text(self.decided("chat_template"))

    @property
    def data(self) -> DataSettings:
        """Every setting the data pipeline reads, typed (plan/data_settings.py)."""
        return data_settings(self)

    @property
    def training(self) -> TrainSettings:
        """Every setting the training recipe reads (TrainingArguments, the collator's padding), typed
        (plan/train_settings.py)."""
        return train_settings(self)

    @property
    def model(self) -> ModelSettings:
        """What loading and assembling the model reads (plan/stage_settings.py)."""
        return model_settings(self)

    @property
    def adapter(self) -> AdapterSettings:
        """The LoRA adapter's settings; `adapter.kind` None for a full fine-tune."""
        return adapter_settings(self)

    @property
    def distributed(self) -> DistributedSettings:
        """FSDP2 and DDP settings of a run over several processes."""
        return distributed_settings(self)

    @property
    def preference(self) -> PreferenceSettings:
        """Preference, reward-model and GRPO training: TRL's trainer and its settings (`trainer` None: supervised)."""
        return preference_settings(self)

    @property
    def grpo(self) -> GrpoSettings:
        """The `trl:` block of `rl: grpo` (only for GRPO runs: the keys are decided then)."""
        return grpo_settings(self)

    @property
    def export(self) -> ExportDefaults:
        """The config's `export:` block (`archtune export`'s defaults)."""
        return export_defaults(self)

    @property
    def eval_sample_packing(self) -> bool:
        return bool(self.decided("eval_sample_packing"))

    @property
    def packs(self) -> bool:
        """Some data this run sees is packed (training or evaluation): the model needs its packing patches."""
        return bool(self.get("sample_packing")) or self.eval_sample_packing

    @property
    def packing_patches(self) -> tuple[str, ...]:
        """Names of the patches (archtune.patches) the model needs before it sees packed rows."""
        return tuple(self.family.patches)

    @property
    def auto_class(self) -> str:
        """The transformers Auto class the model trains with (e.g. the multimodal wrapper's, or a reward
        model's AutoModelForSequenceClassification: `model_auto_class`), or AutoModelForCausalLM for a
        text-only checkpoint of a multimodal family (e.g. gemma3_text, which the image-text Auto class
        does not map), as the meta-device build found."""
        if self.get("model_auto_class"):
            return self.get("model_auto_class")
        structure = self.structure()
        return structure.auto_class if structure is not None else self.family.auto_class

    @property
    def lora_target_redirects(self) -> dict[str, str]:
        """{wrapper class PEFT cannot adapt: attribute of the nn.Linear inside it}."""
        return dict(self.family.lora_target_redirects)

    @property
    def expert_param_names(self) -> tuple[str, ...]:
        return tuple(self.family.expert_param_names)

    @property
    def expert_checkpoint_parts(self) -> dict[str, tuple[str, ...]]:
        """{expert param name: the per-expert checkpoint modules it concatenates} (the family's)."""
        return dict(self.family.expert_checkpoint_parts)

    @property
    def quantize_moe_experts(self) -> bool:
        """The expert tensors (`expert_param_names`) are stored in 4 bits (archtune.moe.quant4)."""
        return bool(self.decided("quantize_moe_experts"))

    def structure(self) -> ModelStructure | None:
        """The model's meta-device skeleton (module and parameter names, classes), or None when
        it cannot be built; `structure_problem()` then says why. Built once, only when asked."""
        try:
            return model_structure(self.model_config, self.family.auto_class)
        except StructureUnavailable:
            return None

    def structure_problem(self) -> str:
        try:
            model_structure(self.model_config, self.family.auto_class)
        except StructureUnavailable as exc:
            return str(exc)
        return ""

    # -- deciding (only rules and resolve call these)
    def set(self, key: str, value: Any, source: Source, reason: str) -> None:
        """Record a decision. A dotted key replaces a whole-value parent (`fsdp_config: null`
        gives way to `fsdp_config.fsdp_version`), and a key replaces its dotted children."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
        parts = key.split(".")
        for i in range(1, len(parts)):
            self.settings.pop(".".join(parts[:i]), None)
        for child in [k for k in self.settings if k.startswith(key + ".")]:
            del self.settings[child]
        self.settings[key] = Decision(value, source, reason)

    def default(self, key: str, value: Any, source: Source, reason: str) -> None:
        """Set unless the user chose a value."""
        if not self.user_set(key):
            self.set(key, value, source, reason)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def note(self, message: str) -> None:
        self.info.append(message)

    def error(self, key: str, message: str, fix: str = "") -> None:
        self.errors.append(Problem(key, message, fix))

    def raise_errors(self) -> None:
        if self.errors:
            raise UserError(list(self.errors))

    def to_json(self) -> dict:
        """The `archtune check --json` object."""
        return {
            "family": self.family.name,
            "model_type": self.model_type,
            "world_size": self.world_size,
            "settings": {k: d.to_dict() for k, d in sorted(self.settings.items())},
            "info": list(self.info),
            "warnings": list(self.warnings),
            "errors": [p.to_dict() for p in self.errors],
        }


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def _config_settings(model: Any, prefix: str = "", explicit: bool = True) -> dict[str, Decision]:
    """Every field of the config as a dotted setting, source user (written in the config or an
    override) or default. A nested block (fsdp_config) is walked field by field, so its unwritten
    fields stay defaults; lists (datasets, normalize_weight_scales) are one value each."""
    settings: dict[str, Decision] = {}
    for name in type(model).model_fields:
        key = f"{prefix}{name}"
        value = getattr(model, name)
        user = explicit and name in model.model_fields_set
        if hasattr(value, "model_fields_set"):
            settings.update(_config_settings(value, key + ".", user))
            continue
        if isinstance(value, list) and value and hasattr(value[0], "model_dump"):
            value = [v.model_dump() for v in value]
        source: Source = "user" if user else "default"
        flat: dict[str, Any] = {}
        _flatten(value, key, flat)
        for k, v in flat.items():
            settings[k] = Decision(v, source, "set in config" if source == "user" else "archtune default")
    return settings


def resolve(cfg: Config, model_config: dict, world_size: int = 1) -> Plan:
    """Config + the model's config.json (as a dict) -> Plan. Never loads weights.

    `world_size` is the number of processes the plan is for (`--nproc`). Problems are gathered
    in `plan.errors` (nothing is raised); `plan.raise_errors()` raises them as one UserError.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, not {world_size}")
    family = detect(model_config)
    types = model_types_of(model_config)
    plan = Plan(config=cfg, family=family, model_type=types[0] if types else "unknown",
                model_config=model_config, world_size=world_size)
    plan.settings = _config_settings(cfg)
    for rule in (*GENERIC_RULES, *family_rules(family), *REFUSALS):
        rule.apply(plan)
    return plan
