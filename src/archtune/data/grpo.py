"""GRPO prompts for `rl: grpo`: read -> your transform -> validate -> split.

GRPO trains on prompts; completions are generated during training. A row is a `prompt` (a string,
or a conversation: a list of {role, content} messages, rendered with the chat template and the
generation prompt by TRL) plus any other columns, which reach your reward functions as keyword
arguments (e.g. `answer`). Rows are read as for the other trainings (local JSON/JSONL/CSV/Parquet
or a hub data set; FILE:LINE for each problem; malformed rows dropped and counted, or all listed
under strict_data).

A dataset's `type` is Axolotl's GRPO transform, your own function named by import path
(`type: rewards.gsm8k_transform`, found beside the config). It is called once with the config and
returns `transform_fn` or `(transform_fn, {"remove_columns": [...]})`; `transform_fn(row)` (or
`transform_fn(row, tokenizer=...)` when it takes a tokenizer) returns the row's new columns, which
replace the old ones of the same name; `remove_columns` drops columns ("__all__": every column the
row had). Without a `type` the rows are used as they are.

A prompt longer than sequence_len tokens is dropped (too_long), whatever excess_length_strategy
says: a cut prompt would ask another question.
"""
from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from archtune.data import formats
from archtune.data.row_errors import FIXES, RowError
from archtune.data.preference import PreferenceData, read_rows
from archtune.data.tokenize import check_tokenizer
from archtune.data.user_code import load_function
from archtune.errors import Problem, UserError

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import Plan

SOURCE = "_source"  # a row's FILE:LINE while rows are prepared


# The prepared rows (train: prompts and the columns reward functions read; eval or None; stats; the
# FILE:LINE of each training row): the container preference data uses.
GrpoData = PreferenceData


@dataclass
class Transform:
    """A dataset's transform: the row function and what it removes."""

    key: str
    path: str
    fn: Callable
    remove: Any = ()  # column names, or "__all__"
    takes_tokenizer: bool = False

    def __call__(self, row: dict, tokenizer) -> dict:
        try:
            out = self.fn(row, tokenizer=tokenizer) if self.takes_tokenizer else self.fn(row)
        except Exception as exc:  # the user's code raised on this row
            raise _TransformFailed(f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(out, dict):
            raise _TransformFailed(f"it returned a {type(out).__name__}, not a dict of columns")
        kept = {} if self.remove == "__all__" else {k: v for k, v in row.items() if k not in self.remove}
        return {**kept, **out}


class _TransformFailed(Exception):
    pass


def load_transform(path: str, key: str, plan: "Plan") -> Transform:
    """Axolotl's transform loader: `path(cfg)` -> transform_fn or (transform_fn, map kwargs)."""
    factory = load_function(path, key, plan.preference.user_code_dir)
    try:
        made = factory(plan.config)
    except Exception as exc:
        raise UserError.single(key, f"{path}(cfg) raised {type(exc).__name__}: {exc}",
                               f"fix {path}: it is called once with the config and returns the row function") from None
    kwargs: dict = {}
    if isinstance(made, tuple):
        if len(made) != 2 or not isinstance(made[1], dict):
            raise UserError.single(key, f"{path}(cfg) returned a tuple that is not (transform_fn, map_kwargs)",
                                   "return transform_fn, or (transform_fn, {'remove_columns': [...]})")
        made, kwargs = made
    if not callable(made):
        raise UserError.single(key, f"{path}(cfg) returned a {type(made).__name__}, not a function",
                               "return the function that turns one row into its columns (Axolotl's transform_fn)")
    unknown = sorted(set(kwargs) - {"remove_columns"})
    if unknown:
        raise UserError.single(key, f"{path}(cfg) returned map arguments archtune does not apply: {', '.join(unknown)}",
                               "return only remove_columns")
    remove = kwargs.get("remove_columns") or ()
    try:
        takes_tokenizer = "tokenizer" in inspect.signature(made).parameters
    except (TypeError, ValueError):
        takes_tokenizer = False
    return Transform(key, path, made, remove if remove == "__all__" else tuple(remove), takes_tokenizer)


def prompt_tokens(prompt: Any, tokenizer) -> int:
    """Tokens of a prompt as TRL builds it: a conversation rendered with the generation prompt, a
    string as it is."""
    if isinstance(prompt, str):
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return len(ids)


def _check_prompt(row: dict) -> None:
    if "prompt" not in row or row["prompt"] is None:
        raise RowError(formats.MISSING_FIELD, "the row has no `prompt` (a string, or a list of messages)")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError(formats.EMPTY, "the prompt is empty")
        return
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in prompt):
        raise RowError(formats.WRONG_TYPE, "`prompt` must be a string or a list of {role, content} messages")


def _prepare_source(src, transform: Transform | None, tokenizer, sequence_len: int, work, dropped: Counter,
                    problems: list, strict: bool) -> list[dict]:
    kept = []
    for where, row in read_rows(src, work):
        try:
            if isinstance(row, RowError):
                raise row
            if transform is not None:
                try:
                    row = transform(row, tokenizer)
                except _TransformFailed as exc:
                    raise UserError.single(transform.key, f"{transform.path} failed on {where}: {exc}",
                                           "fix the transform (or the row)") from None
            _check_prompt(row)
            n = prompt_tokens(row["prompt"], tokenizer)
            if n > sequence_len:
                raise RowError(formats.TOO_LONG, f"a prompt of {n} tokens > sequence_len {sequence_len}")
        except RowError as exc:
            dropped[exc.reason] += 1
            if strict and exc.reason != formats.TOO_LONG:
                problems.append(Problem(where, f"{exc.reason}: {exc.detail}", FIXES[exc.reason]))
            continue
        kept.append({**row, SOURCE: where})
    return kept


def _dataset(rows: list[dict], key: str):
    from datasets import Dataset

    columns = [k for k in dict.fromkeys(k for r in rows for k in r) if k != SOURCE]
    missing = [k for k in columns if any(k not in r for r in rows)]
    if missing:
        raise UserError.single(key, f"rows differ in their columns: {', '.join(missing)} missing in some",
                               "give every row the same columns (your reward functions get each one)")
    try:
        return Dataset.from_dict({k: [r[k] for r in rows] for k in columns})
    except Exception as exc:  # pyarrow cannot hold a column whose rows have different types
        raise UserError.single(key, f"the rows' columns cannot form one table: {exc}",
                               "give each column one type in every row") from None


def prepare_grpo_data(plan: "Plan", tokenizer, *, progress: bool = True) -> GrpoData:
    """The prompts (train, eval) for the plan of an rl: grpo config (`plan.data`)."""
    import tempfile
    from pathlib import Path

    from archtune.data.preference import check_rows, hold_out
    from archtune.data.sources import resolve_source

    data = plan.data
    check_tokenizer(tokenizer)
    entries = [(f"datasets.{i}", ds) for i, ds in enumerate(data.datasets)]
    entries += [(f"test_datasets.{i}", ds) for i, ds in enumerate(data.test_datasets)]
    problems: list[Problem] = []
    dropped, rows_in, train, evals = Counter(), 0, [], []
    with tempfile.TemporaryDirectory(prefix="archtune-grpo-") as work:
        for key, ds in entries:
            transform = load_transform(ds.type, f"{key}.type", plan) if "type" in ds.model_fields_set else None
            src = resolve_source(ds, key)
            before = sum(dropped.values())
            rows = _prepare_source(src, transform, tokenizer, data.sequence_len, Path(work), dropped, problems,
                                   data.strict_data)
            rows_in += len(rows) + sum(dropped.values()) - before
            (evals if key.startswith("test_") else train).extend(rows)
    check_rows(problems, train, rows_in, dropped, "prompts")
    if not data.test_datasets and data.val_set_size > 0:
        train, evals = hold_out(train, data)
    stats = {"kind": "prompts", "rows_in": rows_in, "rows_dropped": dict(sorted(dropped.items())),
             "train_rows": len(train), "eval_rows": len(evals)}
    return GrpoData(_dataset(train, "datasets"), _dataset(evals, "test_datasets") if evals else None, stats,
                    train_sources=[r.get(SOURCE) for r in train])


__all__ = ["GrpoData", "Transform", "load_transform", "prepare_grpo_data", "prompt_tokens"]
