"""Preference data for `rl` and `reward_model` configs: read -> format -> tokenize -> validate -> split.

The rows are read as SFT rows are (local JSON/JSONL/CSV/Parquet or a hub data set, FILE:LINE for
every problem, malformed rows dropped and counted, or all listed at once under strict_data), and
tokenized here, once, into the columns TRL's trainers take, so TRL never re-renders a template:

    paired  (dpo, ipo, orpo, simpo)   prompt_ids, chosen_ids, rejected_ids
    unpaired (kto)                    prompt_ids, completion_ids, label
    reward  (reward_model)            chosen_ids, rejected_ids (whole sequences)

A KTO config may also read paired rows: each pair becomes a desirable and an undesirable row for
training, while an evaluation set of pairs stays paired (so its preference accuracy is a ranking of
the two answers of one prompt).

Formats (`datasets[].type`, Axolotl's names and fields):

- chat_template.default: `field_messages` holds the conversation so far; `field_chosen` /
  `field_rejected` (KTO: `field_completion` and `field_label`) hold an answer as a string, a
  message, or a list of messages whose last one is the answer. The prompt is the conversation
  rendered with the generation prompt; an answer is the rest of the rendering with it appended,
  up to and including the turn's end marker (not the whitespace after it).
- passthrough.default: `field_prompt`, `field_chosen`, `field_rejected` (KTO: `field_completion`,
  `field_label`) are strings used as written; an answer gets the tokenizer's eos, as TRL adds it.
- bradley_terry.chat_template (reward models): `input` (the user turn), `chosen`, `rejected`
  strings (the field_chosen / field_rejected names) and an optional `system`; each answer is scored
  as the whole conversation [system, user, assistant] rendered with the chat template.

bos is added once, as for SFT rows. Prompt and answer are tokenized separately, so the model trains
on exactly the prompt tokens it sees at inference, followed by the answer's own tokens.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from archtune.config.schema import DatasetConfig
from archtune.data import formats, row_errors
from archtune.data.formats import FormatContext, render_chat
from archtune.data.row_errors import FIXES, RowError
from archtune.data.tokenize import is_utf8, bos_to_add, check_tokenizer, special_token_strings
from archtune.errors import Problem, UserError
from archtune.plan.preference import PAIRED, PREFERENCE_TYPES, REWARD, UNPAIRED

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import Plan
    from archtune.plan.data_settings import DataSettings

MAX_LISTED_PROBLEMS = 50


SOURCE = "_source"  # a row's FILE:LINE while rows are prepared (kept beside the datasets, not in them)


@dataclass
class PreferenceData:
    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset or None
    stats: dict = field(default_factory=dict)
    train_sources: list = field(default_factory=list)  # FILE:LINE of each training row


# ---------------------------------------------------------------- formatting one row

@dataclass
class _Encoder:
    tokenizer: Any
    ctx: FormatContext
    bos: int | None
    eos_id: int | None
    eos_text: str | None

    def ids(self, text: str, *, first: bool) -> list[int]:
        if not is_utf8(text):
            raise RowError(row_errors.UNDECODABLE, "the row holds a lone surrogate (e.g. a \\ud800 escape)")
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if first and self.bos is not None and (not ids or ids[0] != self.bos):
            ids.insert(0, self.bos)
        return ids

    def answer_ids(self, text: str, add_eos: bool) -> list[int]:
        ids = self.ids(text, first=False)
        if add_eos and self.eos_id is not None and not (ids and ids[-1] == self.eos_id):
            ids.append(self.eos_id)
        return ids


def _message(value: Any, ds: DatasetConfig, name: str) -> dict:
    """An answer field (a string, a message, or a list of messages) as one assistant message."""
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, dict):
        msgs = formats.row_messages({"m": [value]}, ds.model_copy(update={"field_messages": "m"}))
        return msgs[0]
    raise RowError(row_errors.WRONG_TYPE, f"field {name!r} is {formats.type_name(value)}, expected a string, a "
                                       "message or a list of messages")


def _field(row: dict, name: str) -> Any:
    if row.get(name) is None:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(row_errors.MISSING_FIELD, f"field {name!r} is missing (fields: {present})")
    return row[name]


def _label(row: dict, name: str) -> bool:
    value = _field(row, name)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise RowError(row_errors.WRONG_TYPE, f"field {name!r} is {value!r}, expected true or false")


def _chat_answer(enc: _Encoder, messages: list[dict], prompt: str, answer: dict) -> list[int]:
    full = render_chat(enc.ctx, messages + [answer])
    if not full.startswith(prompt):
        raise RowError(row_errors.TEMPLATE_ERROR, "the chat template renders the conversation differently once the "
                                               "answer is appended, so the prompt is not a prefix of it")
    end = formats.strip_after_end_marker(full, len(prompt), len(full), enc.ctx.special_tokens)
    if not full[len(prompt):end].strip():
        raise RowError(row_errors.EMPTY, "the answer is empty")
    return enc.answer_ids(full[len(prompt):end], add_eos=False)


def _answers(row: dict, ds: DatasetConfig, kind: str) -> list[tuple[str, Any]]:
    """(name, raw answer) pairs of a row: chosen and rejected, or (KTO) the completion."""
    if kind == UNPAIRED and ds.field_completion in row:
        return [(ds.field_completion, row[ds.field_completion])]
    return [(ds.field_chosen, _field(row, ds.field_chosen)), (ds.field_rejected, _field(row, ds.field_rejected))]


def encode_row(row: dict, ds: DatasetConfig, enc: _Encoder, kind: str) -> dict:
    """One row -> {prompt_ids, chosen_ids, rejected_ids} / {prompt_ids, completion_ids, label} /
    (reward) {chosen_ids, rejected_ids}; raises RowError."""
    if ds.type == "bradley_terry.chat_template":
        system = row.get(ds.field_system)
        head = ([{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else [])
        user = formats.get_str(row, "input")
        out = {}
        for key, name in (("chosen_ids", ds.field_chosen), ("rejected_ids", ds.field_rejected)):
            answer = formats.get_str(row, name)
            text = render_chat(enc.ctx, head + [{"role": "user", "content": user},
                                                {"role": "assistant", "content": answer}])
            end = formats.strip_after_end_marker(text, 0, len(text), enc.ctx.special_tokens)
            out[key] = enc.ids(text[:end], first=True)
        return out
    if ds.type == "chat_template.default":
        messages = formats.row_messages(row, ds)
        prompt = render_chat(enc.ctx, messages, add_generation_prompt=True)
        answers = [(name, _chat_answer(enc, messages, prompt, _message(raw, ds, name)))
                   for name, raw in _answers(row, ds, kind)]
    else:  # passthrough.default
        prompt = formats.get_str(row, ds.field_prompt)
        answers = []
        for name, raw in _answers(row, ds, kind):
            if not isinstance(raw, str):
                raise RowError(row_errors.WRONG_TYPE, f"field {name!r} is {formats.type_name(raw)}, expected a string")
            if not raw.strip():
                raise RowError(row_errors.EMPTY, f"field {name!r} is empty")
            answers.append((name, enc.answer_ids(raw, add_eos=True)))
    prompt_ids = enc.ids(prompt, first=True)
    if len(answers) == 1:
        return {"prompt_ids": prompt_ids, "completion_ids": answers[0][1], "label": _label(row, ds.field_label)}
    return {"prompt_ids": prompt_ids, "chosen_ids": answers[0][1], "rejected_ids": answers[1][1]}


def _length(item: dict) -> int:
    """Tokens of the longest sequence the row trains on."""
    prompt = len(item.get("prompt_ids", []))
    return prompt + max(len(v) for k, v in item.items() if k.endswith("_ids") and k != "prompt_ids")


# ---------------------------------------------------------------- reading and splitting

def read_rows(src, work) -> list[tuple[str, Any]]:
    """(FILE:LINE, row dict or a RowError) for every row of a source."""
    from archtune.data.readers import read_source

    out: list[tuple[str, Any]] = []
    for raw, origin in read_source(src, work):
        if "_raw" in raw.column_names:
            for r in raw:
                if r["_err"]:
                    out.append((r["_src"], RowError(r["_err"], r["_detail"] or "")))
                    continue
                try:
                    row = json.loads(r["_raw"])
                except ValueError as exc:
                    out.append((r["_src"], RowError(row_errors.BAD_JSON, f"invalid JSON: {exc}")))
                    continue
                out.append((r["_src"], row if isinstance(row, dict) else
                            RowError(row_errors.BAD_JSON, "a JSON row must be an object")))
        else:
            out.extend((f"{origin}:row {i + 1}", dict(r)) for i, r in enumerate(raw))
    return out


def _encode_source(src, data: "DataSettings", enc: _Encoder, kind: str, work, dropped: Counter,
                   problems: list) -> list[dict]:
    kept = []
    for where, row in read_rows(src, work):
        try:
            if isinstance(row, RowError):
                raise row
            item = encode_row(row, src.cfg, enc, kind)
            if _length(item) > data.sequence_len and data.excess_length_strategy != "truncate":
                raise RowError(row_errors.TOO_LONG, f"{_length(item)} tokens > sequence_len {data.sequence_len}")
        except RowError as exc:
            dropped[exc.reason] += 1
            if data.strict_data and exc.reason != row_errors.TOO_LONG:
                problems.append(Problem(where, f"{exc.reason}: {exc.detail}", FIXES[exc.reason]))
            continue
        kept.append({**item, SOURCE: where})
    return kept


def unpair(rows: list[dict]) -> list[dict]:
    """KTO training rows from pairs: the chosen answer desirable, the rejected one not."""
    out = []
    for r in rows:
        if "completion_ids" in r:
            out.append(r)
            continue
        where = {SOURCE: r[SOURCE]} if SOURCE in r else {}
        out.append({"prompt_ids": r["prompt_ids"], "completion_ids": r["chosen_ids"], "label": True, **where})
        out.append({"prompt_ids": r["prompt_ids"], "completion_ids": r["rejected_ids"], "label": False, **where})
    return out


def _dataset(rows: list[dict]):
    from datasets import Dataset

    columns = sorted({k for r in rows for k in r if k != SOURCE})
    missing = [k for k in columns if any(k not in r for r in rows)]
    if missing:  # a KTO evaluation set mixing pairs and single answers
        raise UserError.single("test_datasets", "the evaluation rows mix pairs (chosen/rejected) and single answers "
                               "(completion/label)", "use one shape for every evaluation data set")
    return Dataset.from_dict({k: [r[k] for r in rows] for k in columns})


def check_rows(problems: list[Problem], train: list, rows_in: int, dropped: Counter, what: str = "rows") -> None:
    """The malformed rows strict_data lists (at most MAX_LISTED_PROBLEMS), or that no training row
    is left, as one UserError."""
    if problems:
        listed = problems[:MAX_LISTED_PROBLEMS]
        if len(problems) > len(listed):
            listed.append(Problem("strict_data", f"... {len(problems) - len(listed)} more malformed rows not listed",
                                  "set strict_data: false to drop and count malformed rows instead"))
        raise UserError(listed)
    if not train:
        why = ", ".join(f"{r} {c}" for r, c in dropped.most_common()) or "the data is empty"
        raise UserError.single("datasets", f"no usable {what} ({rows_in} read; dropped: {why})",
                               "fix the data (strict_data: true lists every bad row as FILE:LINE)")


def hold_out(train: list, data: "DataSettings") -> tuple[list, list]:
    """(training rows, held-out rows): val_set_size of the rows (a fraction, or a count), chosen by seed."""
    import numpy as np

    n_eval = int(data.val_set_size) if data.val_set_size >= 1 else int(np.ceil(len(train) * data.val_set_size))
    if n_eval >= len(train):
        raise UserError.single("val_set_size", f"holds out {n_eval} of the {len(train)} usable rows, leaving none "
                               "to train on", "lower val_set_size (a fraction < 1, or a row count)")
    order = np.random.default_rng(data.seed).permutation(len(train))
    held = set(order[:n_eval].tolist())
    return [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]


def prepare_preference_data(plan: "Plan", tokenizer, *, progress: bool = True) -> PreferenceData:
    """Tokenized preference rows (train, eval) for the plan of an rl or reward_model config (`plan.data`)."""
    import tempfile
    from pathlib import Path


    from archtune.data.sources import resolve_source
    from archtune.data.formats import resolve_chat_template

    data = plan.data
    kind = data.preference_rows
    check_tokenizer(tokenizer)
    entries = [(f"datasets.{i}", ds) for i, ds in enumerate(data.datasets)]
    entries += [(f"test_datasets.{i}", ds) for i, ds in enumerate(data.test_datasets)]
    uses_template = any(ds.type != "passthrough.default" for _, ds in entries)
    template = resolve_chat_template(data.chat_template, tokenizer) if uses_template else None
    enc = _Encoder(tokenizer, FormatContext(tokenizer=tokenizer, chat_template=template,
                                            special_tokens=special_token_strings(tokenizer)),
                   bos_to_add(tokenizer), getattr(tokenizer, "eos_token_id", None),
                   getattr(tokenizer, "eos_token", None))
    dropped: Counter = Counter()
    problems: list[Problem] = []
    train: list[dict] = []
    evals: list[dict] = []
    rows_in = 0
    with tempfile.TemporaryDirectory(prefix="archtune-pref-") as work:
        for key, ds in entries:
            src = resolve_source(ds, key)
            before = sum(dropped.values())
            rows = _encode_source(src, data, enc, kind, Path(work), dropped, problems)
            rows_in += len(rows) + sum(dropped.values()) - before
            (evals if key.startswith("test_") else train).extend(rows)
    check_rows(problems, train, rows_in, dropped)
    if not data.test_datasets and data.val_set_size > 0:
        train, evals = hold_out(train, data)
    if kind == UNPAIRED:
        train = unpair(train)
    stats = {"kind": kind, "rows_in": rows_in, "rows_dropped": dict(sorted(dropped.items())),
             "train_rows": len(train), "eval_rows": len(evals),
             "train_tokens": sum(_tokens(r) for r in train), "eval_tokens": sum(_tokens(r) for r in evals)}
    return PreferenceData(_dataset(train), _dataset(evals) if evals else None, stats,
                          train_sources=[r.get(SOURCE) for r in train])


def _tokens(row: dict) -> int:
    """Tokens a row puts through the model: the prompt once per answer, plus the answers."""
    answers = [v for k, v in row.items() if k.endswith("_ids") and k != "prompt_ids"]
    return sum(len(row.get("prompt_ids", [])) + len(a) for a in answers)


__all__ = ["PAIRED", "UNPAIRED", "REWARD", "PREFERENCE_TYPES", "PreferenceData", "encode_row",
           "prepare_preference_data", "unpair"]
