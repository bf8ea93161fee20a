"""The data pipeline: load -> format -> tokenize + mask -> validate -> split -> cache.

    prepared = prepare_data(plan, tokenizer)   # plan.data: every setting it reads (plan/data_settings.py)
    prepared.train  # datasets.Dataset: input_ids, labels (-100 = no loss), length
    prepared.eval   # same columns, or None
    prepared.stats  # JSON-able counts (see STATS_KEYS)

Reading. Local files and directories (JSON, JSONL, Parquet, CSV; the type from the
extension or `ds_type`) or a hub id (sources.py), read row by row as written (readers.py).

Validation. A malformed row is dropped and counted by reason (row_errors.DROP_REASONS); with
`strict_data: true` every malformed row is reported at once as a UserError instead. Rows
longer than sequence_len follow excess_length_strategy (not an error under strict_data).
"""
from __future__ import annotations

import logging
import math
import shutil
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from typing import TYPE_CHECKING

from archtune.config.schema import DatasetConfig
from archtune.data import cache, row_errors
from archtune.data.row_errors import DROP_REASONS, FIXES
from archtune.data.packing import pack_dataset, packing_stats
from archtune.data.readers import read_source
from archtune.data.sources import Source, resolve_source, slice_rows
from archtune.data.tokenize import IGNORE_INDEX, RowEncoder, TokenizeSettings, check_eot_tokens, check_tokenizer
from archtune.errors import Problem, UserError

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import Plan
    from archtune.plan.data_settings import DataSettings

log = logging.getLogger(__name__)

STATS_KEYS: tuple[str, ...] = (
    "rows_in", "rows_kept", "rows_dropped", "tokens", "label_tokens", "train_rows", "eval_rows",
    "train_tokens", "eval_tokens", "truncated", "mask_realigned", "image_rows", "audio_rows", "sources", "cache", "cache_dir")
# Reasons that strict_data turns into errors: everything but too_long, which
# excess_length_strategy governs.
STRICT_REASONS = frozenset(DROP_REASONS) - {row_errors.TOO_LONG}
MAX_LISTED_PROBLEMS = 50
_CHUNK_ROWS = 100_000
_META = ("_drop", "_detail", "_src", "_truncated", "_realigned")


@dataclass
class PreparedData:
    train: "datasets.Dataset"  # noqa: F821
    eval: "datasets.Dataset | None"  # noqa: F821
    stats: dict = field(default_factory=dict)


# ================================================================ tokenizing

@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    from datasets.utils import logging as dlog

    was = dlog.is_progress_bar_enabled()
    (dlog.enable_progress_bar if enabled else dlog.disable_progress_bar)()
    try:
        yield
    finally:
        (dlog.enable_progress_bar if was else dlog.disable_progress_bar)()


def _tokenize_source(src: Source, tokenizer, settings: TokenizeSettings, work: Path, tag: str, media=None):
    from datasets import Dataset, concatenate_datasets

    from archtune.data.tokenize import output_features

    encoder = RowEncoder(tokenizer, src.cfg, settings, media=media.processor if media else None,
                         media_refusal=media.refusal if media else None)
    parts = []
    sources = list(read_source(src, work))
    if not src.hub and "[" in src.cfg.split:  # local files: datasets' slice syntax, applied to the split's rows
        raws = [raw for raw, _ in sources]
        whole = raws[0] if len(raws) == 1 else concatenate_datasets(raws)
        sources = [(slice_rows(whole, src.cfg.split), f"{src.cfg.path}[{src.cfg.split}]")]
    for n, (raw, origin) in enumerate(sources):
        if len(raw) == 0:  # an empty file: map would return it without the output columns
            parts.append(Dataset.from_dict({c: [] for c in encoder.columns}, features=output_features(encoder.media is not None)))
            continue
        # One process: the Rust tokenizer already encodes each batch on all cores.
        parts.append(raw.map(
            encoder, batched=True, batch_size=1000, with_indices=True, fn_kwargs={"origin": origin},
            remove_columns=raw.column_names, features=output_features(encoder.media is not None),
            cache_file_name=str(work / f"{tag}-{n}.arrow"), load_from_cache_file=False,
            new_fingerprint=f"archtune-{tag}-{n}", desc=f"Tokenizing {src.key} ({Path(origin).name})"))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


@dataclass
class _Tally:
    """Counts over the tokenized rows of some sources, and the ones to keep."""

    kept: object  # Dataset of kept rows, meta columns removed
    rows_in: int
    dropped: Counter
    truncated: int
    realigned: int
    problems: list[Problem]
    sources: list[dict]


def _tally(parts: list[tuple[Source, object]], strict: bool) -> _Tally:
    from datasets import concatenate_datasets

    dropped: Counter = Counter()
    problems: list[Problem] = []
    sources = []
    kept_parts = []
    rows_in = truncated = realigned = 0
    for src, tok in parts:
        drops = tok["_drop"][:]
        here = Counter(d for d in drops if d)
        keep = [i for i, d in enumerate(drops) if not d]
        if strict and any(r in STRICT_REASONS for r in here):
            bad = [i for i, d in enumerate(drops) if d in STRICT_REASONS]
            for i in bad[: MAX_LISTED_PROBLEMS + 1]:
                row = tok[i]
                problems.append(Problem(row["_src"], f"{row['_drop']}: {row['_detail']}", FIXES[row["_drop"]]))
        shape = here[row_errors.MISSING_FIELD] + here[row_errors.WRONG_TYPE]
        if drops and shape == len(drops):  # not one row has the shape its type reads: one message, not one per row
            first = next(i for i, d in enumerate(drops) if d)
            problems.insert(0, _type_mismatch(src, tok[first]["_detail"]))
            dropped += here
            rows_in += len(drops)
            continue
        kept_rows = _select(tok, keep)
        truncated += sum(kept_rows["_truncated"][:]) if keep else 0
        realigned += sum(kept_rows["_realigned"][:]) if keep else 0
        rows_in += len(drops)
        dropped += here
        sources.append({"key": src.key, "path": src.cfg.path, "rows_in": len(drops), "rows_kept": len(keep),
                        "rows_dropped": dict(sorted(here.items()))})
        # Each kept row remembers its FILE:LINE ("source"): a training step that goes wrong names its rows.
        kept_parts.append(kept_rows.remove_columns([c for c in _META if c != "_src"]).rename_column("_src", "source"))
    if not kept_parts:
        return _Tally([], rows_in, dropped, truncated, realigned, problems, sources)
    kept = kept_parts[0] if len(kept_parts) == 1 else concatenate_datasets(kept_parts)
    return _Tally(kept, rows_in, dropped, truncated, realigned, problems, sources)


def expected_row(ds: DatasetConfig) -> str:
    """One row of the shape `ds.type` reads, with the entry's field names."""
    if ds.type == "chat_template":
        role = ds.message_property_mappings.get("role", "role")
        content = ds.message_property_mappings.get("content", "content")
        return (f'{{"{ds.field_messages}": [{{"{role}": "user", "{content}": "..."}}, '
                f'{{"{role}": "assistant", "{content}": "..."}}]}}')
    if ds.type == "completion":
        return f'{{"{ds.field}": "..."}}'
    return f'{{"{ds.field_instruction}": "...", "{ds.field_input}": "" (optional), "{ds.field_output}": "..."}}'


def _type_mismatch(src: Source, detail: str) -> Problem:
    return Problem(f"{src.key}.type", f"no row of {src.cfg.path} has the shape `type: {src.cfg.type}` reads: {detail}",
                   f"expected rows like {expected_row(src.cfg)}; set {src.key}.type to the data's format, or map "
                   "the fields (field_messages, message_property_mappings, field_instruction/field_output, field)")


def _select(ds, indices: list[int]):
    # An explicit fingerprint: datasets would otherwise hash the whole index list.
    return ds.select(indices, new_fingerprint=f"{ds._fingerprint}-sel-{len(indices)}-{hash(tuple(indices))}")


def _saved_tokens(path: Path) -> tuple[int, int]:
    """(tokens, label tokens) of a saved split, counted by Arrow over the memory-mapped file."""
    from datasets import load_from_disk

    if not path.is_dir():
        return 0, 0
    return _label_tokens(load_from_disk(str(path)))


def _label_tokens(ds) -> tuple[int, int]:
    import pyarrow.compute as pc

    if len(ds) == 0:
        return 0, 0
    labels = pc.list_flatten(ds.data.column("labels"))
    return (int(pc.sum(ds.data.column("length")).as_py()),
            int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0))


def _split(train, data: "DataSettings"):
    """Hold out val_set_size rows, chosen by seed; both parts keep the file order."""
    import numpy as np

    n = len(train)
    size = data.val_set_size
    n_eval = int(size) if size >= 1 else math.ceil(n * size)
    if n_eval >= n:
        raise UserError.single("val_set_size", f"holds out {n_eval} of the {n} usable rows, leaving none to train on",
                               "lower val_set_size (a fraction < 1, or a row count)")
    order = np.random.default_rng(data.seed).permutation(n)
    return _select(train, sorted(order[n_eval:].tolist())), _select(train, sorted(order[:n_eval].tolist()))


def _no_rows_error(key: str, tally: _Tally) -> UserError:
    why = ", ".join(f"{r} {c}" for r, c in tally.dropped.most_common()) or "the data is empty"
    return UserError.single(key, f"no usable rows ({tally.rows_in} read; dropped: {why})",
                            "fix the data (strict_data: true lists every bad row as FILE:LINE)")


def _build(data: "DataSettings", tokenizer, train_srcs, eval_srcs, tmp: Path, media=None):
    settings = TokenizeSettings(sequence_len=data.sequence_len, excess_length_strategy=data.excess_length_strategy,
                                train_on_inputs=data.train_on_inputs, chat_template=data.chat_template,
                                eot_tokens=data.eot_tokens)
    work = tmp / "_work"
    work.mkdir()
    train_parts = [(s, _tokenize_source(s, tokenizer, settings, work, f"train{i}", media))
                   for i, s in enumerate(train_srcs)]
    eval_parts = [(s, _tokenize_source(s, tokenizer, settings, work, f"eval{i}", media))
                  for i, s in enumerate(eval_srcs)]
    t = _tally(train_parts, data.strict_data)
    e = _tally(eval_parts, data.strict_data) if eval_parts else None
    problems = t.problems + (e.problems if e else [])
    mismatched = [p for p in problems if p.key.endswith(".type")]
    if mismatched:
        raise UserError(mismatched)
    if problems:
        total = sum(n for r, n in t.dropped.items() if r in STRICT_REASONS)
        total += sum(n for r, n in e.dropped.items() if r in STRICT_REASONS) if e else 0
        listed = problems[:MAX_LISTED_PROBLEMS]
        if total > len(listed):
            listed.append(Problem("strict_data", f"... {total - len(listed)} more malformed rows not listed",
                                  "set strict_data: false to drop and count malformed rows instead"))
        raise UserError(listed)
    if len(t.kept) == 0:
        raise _no_rows_error("datasets", t)
    if e is not None and len(e.kept) == 0:
        raise _no_rows_error("test_datasets", e)
    train, ev = t.kept, (e.kept if e else None)
    if ev is None and data.val_set_size > 0:
        train, ev = _split(train, data)
    train.save_to_disk(str(tmp / "train"))
    if ev is not None:
        ev.save_to_disk(str(tmp / "eval"))
    shutil.rmtree(work, ignore_errors=True)

    dropped = t.dropped + (e.dropped if e else Counter())
    (train_tokens, train_labels), (eval_tokens, eval_labels) = _saved_tokens(tmp / "train"), _saved_tokens(tmp / "eval")
    return {
        "rows_in": t.rows_in + (e.rows_in if e else 0),
        "rows_kept": len(t.kept) + (len(e.kept) if e else 0),
        "rows_dropped": {r: dropped.get(r, 0) for r in DROP_REASONS},
        "tokens": train_tokens + eval_tokens,
        "label_tokens": train_labels + eval_labels,
        "train_rows": len(train),
        "eval_rows": len(ev) if ev is not None else 0,
        "train_tokens": train_tokens,
        "eval_tokens": eval_tokens,
        "truncated": t.truncated + (e.truncated if e else 0),
        "mask_realigned": t.realigned + (e.realigned if e else 0),
        "image_rows": {"train": _media_rows(train, "images"), "eval": _media_rows(ev, "images")},
        "audio_rows": {"train": _media_rows(train, "audios"), "eval": _media_rows(ev, "audios")},
        "sources": t.sources + (e.sources if e else []),
    }


def _media_rows(ds, column: str) -> int:
    """Rows of a split that carry media in `column` (images, audios; 0 when the run reads none)."""
    import pyarrow.compute as pc

    if ds is None or len(ds) == 0 or column not in ds.column_names:
        return 0
    return int(pc.sum(pc.greater(pc.list_value_length(ds.data.column(column)), 0)).as_py() or 0)


# ================================================================ entry point

def _refuse_packed_media(data: "DataSettings", stats: dict, media: MediaSetup | None) -> None:
    """Packing would drop the image and audio columns (or, exactly done, needs the model's
    per-document media attention): rows with media are never packed unless the family says it is exact."""
    for kind, rows in (("images", stats.get("image_rows") or {}), ("audio", stats.get("audio_rows") or {})):
        for split, key, on in (("train", "sample_packing", data.sample_packing),
                               ("eval", "eval_sample_packing", data.eval_sample_packing)):
            if on and rows.get(split) and (media is None or media.packing_refusal):
                why = media.packing_refusal if media is not None else f"packing does not carry {kind}"
                raise UserError.single(key, f"{rows[split]} {split} rows carry {kind}, which are not packed: {why}",
                                       f"set {key}: false for this data")


@dataclass
class MediaSetup:
    """How a run reads rows with images: the model's processor (data.media.MediaProcessor), or
    None and the reason such rows are refused; `packing_refusal`: why packed batches cannot hold
    image rows for this model (None: packing them is exact)."""

    processor: object = None
    refusal: str | None = None
    packing_refusal: str | None = None


def prepare_data(plan: "Plan", tokenizer, *, progress: bool = True, media: MediaSetup | None = None) -> PreparedData:
    """Tokenized, masked, validated train (and eval) data, from the cache when it has them, as the
    plan decided (`plan.data`).

    Raises UserError naming the key (datasets.N.path, val_set_size, ...) or FILE:LINE.
    """
    data = plan.data
    check_tokenizer(tokenizer)
    check_eot_tokens(tokenizer, data.eot_tokens)
    train_srcs = [resolve_source(ds, f"datasets.{i}") for i, ds in enumerate(data.datasets)]
    eval_srcs = [resolve_source(ds, f"test_datasets.{i}") for i, ds in enumerate(data.test_datasets)]
    described = [s.describe() for s in train_srcs + eval_srcs]
    if media is not None and media.processor is not None:
        described.append({"processor": media.processor.fingerprint()})
    key, material = cache.cache_key(plan.config, tokenizer, described)
    root = Path(data.prepared_path)
    entry = (root / key).resolve()
    hit = None if data.skip_prepare_dataset else cache.load(entry)
    if data.skip_prepare_dataset:  # Axolotl's meaning: tokenize for this run only, write no cache
        import tempfile

        with _progress_bars(progress), tempfile.TemporaryDirectory(prefix="archtune-data-") as tmp:
            stats = _build(data, tokenizer, train_srcs, eval_srcs, Path(tmp), media)
            cache.write_json(Path(tmp) / cache.STATS_FILE, stats)
            hit = cache.load(Path(tmp), in_memory=True)
        state, entry = "skipped", Path("(not cached: skip_prepare_dataset)")
    elif hit is None:
        with _progress_bars(progress), cache.staging(root, key) as tmp:
            stats = _build(data, tokenizer, train_srcs, eval_srcs, tmp, media)
            cache.write_json(tmp / "key.json", material)
            cache.write_json(tmp / cache.STATS_FILE, stats)
            cache.commit(tmp, entry)
        hit = cache.load(entry)
        if hit is None:
            raise UserError.single("dataset_prepared_path", f"could not read back the cache entry {entry}",
                                   "check that the directory is writable and not full")
        state = "miss"
    else:
        state = "hit"
    train, ev, stats = hit
    stats = {**stats, "cache": state, "cache_dir": str(entry)}
    _refuse_packed_media(data, stats, media)
    # Packing runs after the cache, so turning it on or off never re-tokenizes.
    if data.sample_packing:
        train = pack_dataset(train, data.sequence_len, seed=data.seed)
        stats["packing"] = {"train": packing_stats(train, data.sequence_len)}
    if ev is not None and data.eval_sample_packing:
        ev = pack_dataset(ev, data.sequence_len, seed=data.seed)
        stats.setdefault("packing", {})["eval"] = packing_stats(ev, data.sequence_len)
    dropped = {r: n for r, n in stats["rows_dropped"].items() if n}
    log.info("data: %d train rows, %d eval rows, %d tokens (cache %s: %s)%s", stats["train_rows"],
             stats["eval_rows"], stats["tokens"], state, entry,
             f"; dropped {dropped}" if dropped else "")
    return PreparedData(train=train, eval=ev, stats=stats)


__all__ = ["PreparedData", "prepare_data", "STATS_KEYS"]
