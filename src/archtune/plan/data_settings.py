"""What the data pipeline reads from the plan: one typed, frozen view (`plan.data`).

data/ takes every decision it needs from here (packing, sequence length, masking, templates,
validation, the split, the cache directory) and none from the raw config; the dataset entries
themselves (paths, types, field names) are the plan's config values, passed through as written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from archtune.plan.shared import Rule

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import Plan

# Where tokenized data sets are cached when `dataset_prepared_path` is not given (Axolotl's name).
DEFAULT_PREPARED_PATH = "last_run_prepared"


@dataclass(frozen=True)
class DataSettings:
    datasets: tuple[Any, ...]  # config.schema.DatasetConfig entries, as written
    test_datasets: tuple[Any, ...]
    sequence_len: int
    excess_length_strategy: str  # "drop" | "truncate"
    train_on_inputs: bool
    # The chat template to render with: the Jinja text of a built-in name or as written; None: the
    # tokenizer's own (tokenizer_default, or not set).
    chat_template: str | None
    eot_tokens: tuple[str, ...]
    strict_data: bool
    val_set_size: float
    seed: int
    sample_packing: bool
    eval_sample_packing: bool
    prepared_path: str
    skip_prepare_dataset: bool
    image_size: tuple[int, ...] | None  # (height, width) images are resized to first; None: as they are
    image_resize_algorithm: str
    preference_rows: str | None  # "paired" | "unpaired" | "reward" for rl / reward_model; None: supervised


def chat_template_text(name: str | None) -> str | None:
    """`chat_template` as decided -> the Jinja text to render with (None: the tokenizer's own)."""
    from archtune.families import chat_templates

    if name is None or name == "tokenizer_default":
        return None
    return chat_templates().get(name, name)


def data_settings(plan: "Plan") -> DataSettings:
    d = plan.decided
    return DataSettings(
        datasets=tuple(plan.config.datasets),
        test_datasets=tuple(plan.config.test_datasets or ()),
        sequence_len=int(d("sequence_len")),
        excess_length_strategy=str(d("excess_length_strategy")),
        train_on_inputs=bool(d("train_on_inputs")),
        chat_template=plan.chat_template,
        eot_tokens=tuple(d("eot_tokens") or ()),
        strict_data=bool(d("strict_data")),
        val_set_size=d("val_set_size"),
        seed=int(d("seed")),
        sample_packing=bool(d("sample_packing")),
        eval_sample_packing=bool(d("eval_sample_packing")),
        prepared_path=str(d("dataset_prepared_path")),
        skip_prepare_dataset=bool(d("skip_prepare_dataset")),
        image_size=_image_size(d("image_size")),
        image_resize_algorithm=str(d("image_resize_algorithm")),
        preference_rows=d("preference_rows"),
    )


def _image_size(value) -> tuple[int, ...] | None:
    """Axolotl's `image_size`: an int is a square, a list is [height, width]."""
    if not value:
        return None
    return (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)


def _dataset_prepared_path(plan: "Plan") -> None:
    if plan.get("dataset_prepared_path") is None:  # not given (or null)
        plan.set("dataset_prepared_path", DEFAULT_PREPARED_PATH, "default",
                 f"tokenized data is cached under ./{DEFAULT_PREPARED_PATH} (Axolotl's default)")


def _image_resize_algorithm(plan: "Plan") -> None:
    if plan.get("image_resize_algorithm") is None:
        plan.set("image_resize_algorithm", "bilinear", "default", "Axolotl's default resampling filter")


DATA_RULES: tuple[Rule, ...] = (Rule(
    "dataset_prepared_path",
    "Tokenized data sets are cached under `dataset_prepared_path`, `last_run_prepared` when not given, keyed by the "
    "data files, the tokenizer and the keys that shape tokens.", _dataset_prepared_path), Rule(
    "image_resize_algorithm",
    "Images resized to `image_size` use `image_resize_algorithm`, bilinear when not given.",
    _image_resize_algorithm))


__all__ = ["DataSettings", "DATA_RULES", "DEFAULT_PREPARED_PATH", "chat_template_text", "data_settings"]
