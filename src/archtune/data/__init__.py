"""The data pipeline: load -> format -> tokenize + mask -> validate -> split -> cache.

    prepared = prepare_data(cfg, tokenizer)
    prepared.train  # datasets.Dataset: input_ids, labels (-100 = no loss), length
    prepared.eval   # same columns, or None
    prepared.stats  # JSON-able counts (see STATS_KEYS)

Reading. Local files and directories (JSON, JSONL, Parquet, CSV; the type from the
extension or `ds_type`) or a hub id. JSON/JSONL and CSV files are read here, line by line,
rather than by `datasets.load_dataset`: one bad line must cost one row, not the run, and a
row's problems are reported as FILE:LINE with the line it started on. Rows reach the
formatter exactly as written (Arrow would unify the schemas of all rows first, adding null
keys and failing on a field whose type varies). Parquet files and hub data sets go through
`datasets.load_dataset`; their rows are named FILE:row N.

Validation. A malformed row is dropped and counted by reason (formats.DROP_REASONS); with
`strict_data: true` every malformed row is reported at once as a UserError instead. Rows
longer than sequence_len follow excess_length_strategy (not an error under strict_data).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from archtune.config.schema import Config, DatasetConfig
from archtune.data import cache, formats
from archtune.data.collate import DataCollator
from archtune.data.formats import DROP_REASONS, FIXES, render_prompt
from archtune.data.packing import pack_dataset, packing_stats
from archtune.data.tokenize import IGNORE_INDEX, RowEncoder, TokenizeSettings, check_tokenizer, encode_prompt
from archtune.errors import Problem, UserError

log = logging.getLogger(__name__)

EXTENSIONS: dict[str, str] = {
    ".json": "json", ".jsonl": "json", ".ndjson": "json", ".jsonlines": "json",
    ".parquet": "parquet", ".pq": "parquet", ".csv": "csv",
}
STATS_KEYS: tuple[str, ...] = (
    "rows_in", "rows_kept", "rows_dropped", "tokens", "label_tokens", "train_rows", "eval_rows",
    "train_tokens", "eval_tokens", "truncated", "mask_realigned", "sources", "cache", "cache_dir")
# Reasons that strict_data turns into errors: everything but too_long, which
# excess_length_strategy governs.
STRICT_REASONS = frozenset(DROP_REASONS) - {formats.TOO_LONG}
MAX_LISTED_PROBLEMS = 50
_CHUNK_ROWS = 100_000
_META = ("_drop", "_detail", "_src", "_truncated", "_realigned")


@dataclass
class PreparedData:
    train: "datasets.Dataset"  # noqa: F821
    eval: "datasets.Dataset | None"  # noqa: F821
    stats: dict = field(default_factory=dict)


# ================================================================ sources

@dataclass
class Source:
    key: str  # "datasets.0" / "test_datasets.1": the config key errors name
    cfg: DatasetConfig
    files: list[tuple[Path, str]] = field(default_factory=list)  # (file, json|parquet|csv)
    hub: bool = False

    def describe(self) -> dict:
        """What the cache key covers for this entry: file contents, or the hub coordinates."""
        if self.hub:
            c = self.cfg
            return {"key": self.key, "hub": c.path, "name": c.name, "split": c.split, "data_files": c.data_files}
        digests = []
        for path, kind in self.files:
            try:
                digests.append([kind, cache.file_digest(path)])
            except OSError as exc:
                raise UserError.single(f"{self.key}.path", f"cannot read {path}: {exc.strerror or exc}",
                                       "check that the file is readable (permissions, a broken link)") from None
        return {"key": self.key, "files": digests}


def _file_kind(path: Path, ds: DatasetConfig, key: str) -> str:
    if ds.ds_type:
        return ds.ds_type
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise UserError.single(
            f"{key}.ds_type", f"cannot tell the type of {path} from its extension",
            f"set {key}.ds_type to json, parquet or csv (or rename the file to .jsonl/.json/.parquet/.csv)")
    return kind


def _looks_local(path: str) -> bool:
    p = Path(path)
    return (p.is_absolute() or path.startswith(("./", "../", "~", ".\\"))
            or p.suffix.lower() in EXTENSIONS or path.count("/") > 1)


def _dir_files(root: Path, ds: DatasetConfig, key: str) -> list[Path]:
    from datasets.data_files import DataFilesDict, get_data_patterns, resolve_pattern

    try:
        if ds.data_files:
            patterns = [ds.data_files] if isinstance(ds.data_files, str) else list(ds.data_files)
            found: list[str] = []
            for pattern in patterns:
                found += [f for f in resolve_pattern(pattern, base_path=str(root)) if f not in found]
        else:
            splits = {str(k): v for k, v in get_data_patterns(str(root)).items()}
            if ds.split not in splits:
                raise UserError.single(
                    f"{key}.split", f"{root} has no files for split {ds.split!r} (it has: {', '.join(sorted(splits))})",
                    f"set {key}.split to one of them, or name the files with {key}.data_files")
            found = list(DataFilesDict.from_patterns({ds.split: splits[ds.split]}, base_path=str(root))[ds.split])
    except UserError:
        raise
    except Exception as exc:  # FileNotFoundError, EmptyDatasetError
        raise UserError.single(f"{key}.data_files" if ds.data_files else f"{key}.path",
                               f"no data files found in {root}: {exc}",
                               "check the directory and data_files patterns") from None
    files = [Path(f) for f in found]
    typed = [f for f in files if f.suffix.lower() in EXTENSIONS
             and (ds.ds_type is None or EXTENSIONS[f.suffix.lower()] == ds.ds_type)]
    if not typed and ds.ds_type and ds.data_files:
        typed = files  # the user named the files and said what they are
    if not typed:
        raise UserError.single(f"{key}.path", f"no .json/.jsonl/.parquet/.csv files in {root}",
                               f"put the data files there, or name them with {key}.data_files and {key}.ds_type")
    return sorted(typed) if not ds.data_files else typed


def resolve_source(ds: DatasetConfig, key: str) -> Source:
    """Which files an entry reads (nothing is read yet), or that it is a hub data set.

    A local path that exists is read; one that does not but looks like a path (absolute,
    ./, ~, a data file extension, two or more slashes) is an error; anything else is a hub
    id. `split` chooses files inside a directory (train.jsonl / test.jsonl, as datasets
    names them) and is ignored for a single file."""
    path = Path(ds.path).expanduser()
    if path.is_file():
        return Source(key, ds, [(path, _file_kind(path, ds, key))])
    if path.is_dir():
        return Source(key, ds, [(f, _file_kind(f, ds, key)) for f in _dir_files(path, ds, key)])
    if path.exists():
        raise UserError.single(f"{key}.path", f"{ds.path} is neither a file nor a directory", "point it at a data file")
    if _looks_local(ds.path):
        raise UserError.single(f"{key}.path", f"{ds.path} does not exist (working directory: {os.getcwd()})",
                               "fix the path (relative paths start from the working directory)")
    return Source(key, ds, hub=True)


# ================================================================ readers
# Raw rows are a Dataset with _raw (the row as JSON text), _src (FILE:LINE), and _err /
# _detail (why the line could not even be read); RowEncoder parses and formats them.

_RAW_FEATURES = None


def _raw_features():
    global _RAW_FEATURES
    if _RAW_FEATURES is None:
        from datasets import Features, Value

        _RAW_FEATURES = Features({c: Value("string") for c in ("_raw", "_src", "_err", "_detail")})
    return _RAW_FEATURES


class _RawRows:
    def __init__(self) -> None:
        self.cols: dict[str, list] = {c: [] for c in ("_raw", "_src", "_err", "_detail")}
        self.parts: list = []

    def add(self, src: str, raw: str | None, err: str | None = None, detail: str | None = None) -> None:
        for c, v in (("_raw", raw), ("_src", src), ("_err", err), ("_detail", detail)):
            self.cols[c].append(v)
        if len(self.cols["_src"]) >= _CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        from datasets import Dataset

        self.parts.append(Dataset.from_dict(self.cols, features=_raw_features()))
        self.cols = {c: [] for c in self.cols}

    def dataset(self):
        from datasets import concatenate_datasets

        if self.cols["_src"] or not self.parts:
            self._flush()
        return self.parts[0] if len(self.parts) == 1 else concatenate_datasets(self.parts)


_SURROGATES = re.compile("[\udc80-\udcff]")


def _undecodable_detail(exc: UnicodeDecodeError) -> str:
    return f"invalid UTF-8 byte 0x{exc.object[exc.start]:02x} at column {exc.start + 1}"


def _read_jsonl(path: Path, shown: str, rows: _RawRows) -> None:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            line = line.strip()
            if not line:
                continue
            try:
                rows.add(f"{shown}:{lineno}", line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                rows.add(f"{shown}:{lineno}", None, formats.UNDECODABLE, _undecodable_detail(exc))


def _read_json_array(text: str, shown: str, rows: _RawRows) -> None:
    """A JSON document holding a list of rows; each row is named by the line it starts on."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    i = ws.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    expect_item = True
    while i < len(text) and text[i] != "]":
        line += text.count("\n", counted, i)
        counted = i
        try:
            if not expect_item:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            err_line = text.count("\n", 0, exc.pos) + 1
            raise UserError.single(
                f"{shown}:{err_line}", f"invalid JSON array: {exc.msg}",
                "fix the JSON there, or write the data as JSONL (one object per line), where a bad "
                "line is dropped and counted instead of stopping the run") from None
        if _SURROGATES.search(json.dumps(obj, ensure_ascii=False)):
            rows.add(f"{shown}:{line}", None, formats.UNDECODABLE, "invalid UTF-8 bytes in the row")
        else:
            rows.add(f"{shown}:{line}", json.dumps(obj, ensure_ascii=False))
        i = ws.match(text, end).end()
        expect_item = i < len(text) and text[i] == ","
        if expect_item:
            i = ws.match(text, i + 1).end()
    if i >= len(text):
        raise UserError.single(f"{shown}:{text.count(chr(10)) + 1}", "invalid JSON array: no closing ']'",
                               "fix the end of the file, or write the data as JSONL")


def _read_json(path: Path, shown: str, rows: _RawRows) -> None:
    with open(path, "rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"["):
        text = path.read_bytes().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
        _read_json_array(text, shown, rows)
        return
    if head.startswith(b"{\n") or head.startswith(b"{\r\n") or head == b"{":
        # A pretty-printed single object: one row (a JSONL file never starts that way).
        try:
            obj = json.loads(path.read_bytes().decode("utf-8").lstrip("\ufeff"))
        except ValueError:
            pass
        else:
            rows.add(f"{shown}:1", json.dumps(obj, ensure_ascii=False))
            return
    _read_jsonl(path, shown, rows)


def _read_csv(path: Path, shown: str, rows: _RawRows) -> None:
    """CSV with a header line; every cell is a string (no type guessing); empty cells are ''."""
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise UserError.single(f"{shown}:1", f"unreadable CSV header: {exc}", "fix the CSV file") from None
        if _SURROGATES.search("".join(header)):
            raise UserError.single(f"{shown}:1", "the CSV header is not UTF-8", "save the file as UTF-8")
        end = reader.line_num
        while True:
            start = end + 1
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:  # e.g. a quote never closed: the rest of the file is one cell
                rows.add(f"{shown}:{start}", None, formats.BAD_JSON, f"unreadable CSV record: {exc}")
                break
            end = reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            if _SURROGATES.search("".join(record)):
                rows.add(f"{shown}:{start}", None, formats.UNDECODABLE, "invalid UTF-8 bytes in the record")
                continue
            rows.add(f"{shown}:{start}", json.dumps(dict(zip(header, record)), ensure_ascii=False))


def _load_dataset_error(src: Source, what: str, exc: Exception) -> UserError:
    return UserError.single(f"{src.key}.path", f"could not read {what}: {type(exc).__name__}: {exc}",
                            f"check {src.key}.path (and name, split, data_files)")


def _read_source(src: Source, work: Path) -> Iterator[tuple[object, str]]:
    """(raw Dataset, origin name) per file (one for a hub data set). Local Parquet files are
    converted under `work` (deleted once the entry is written), not in the global HF cache."""
    from datasets import load_dataset

    ds = src.cfg
    if src.hub:
        try:
            yield load_dataset(ds.path, ds.name, split=ds.split, data_files=ds.data_files), f"{ds.path}[{ds.split}]"
        except UserError:
            raise
        except Exception as exc:
            raise UserError.single(
                f"{src.key}.path", f"{ds.path} is not a local file or directory, and loading it as a hub "
                f"data set failed: {type(exc).__name__}: {exc}",
                "fix the path of a local file, or check the hub id, name, split and network access") from None
        return
    for path, kind in src.files:
        shown = str(path)
        try:
            if kind == "parquet":
                yield load_dataset("parquet", data_files=[str(path)], split="train",
                                   cache_dir=str(work / "hf")), shown
                continue
            rows = _RawRows()
            (_read_csv if kind == "csv" else _read_json)(path, shown, rows)
            yield rows.dataset(), shown
        except (UserError, GeneratorExit):
            raise
        except Exception as exc:
            raise _load_dataset_error(src, shown, exc) from None


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


def _tokenize_source(src: Source, tokenizer, settings: TokenizeSettings, work: Path, tag: str):
    from datasets import concatenate_datasets

    from archtune.data.tokenize import output_features

    encoder = RowEncoder(tokenizer, src.cfg, settings)
    parts = []
    for n, (raw, origin) in enumerate(_read_source(src, work)):
        # One process: the Rust tokenizer already encodes each batch on all cores.
        parts.append(raw.map(
            encoder, batched=True, batch_size=1000, with_indices=True, fn_kwargs={"origin": origin},
            remove_columns=raw.column_names, features=output_features(),
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
        kept_rows = _select(tok, keep)
        truncated += sum(kept_rows["_truncated"][:]) if keep else 0
        realigned += sum(kept_rows["_realigned"][:]) if keep else 0
        rows_in += len(drops)
        dropped += here
        sources.append({"key": src.key, "path": src.cfg.path, "rows_in": len(drops), "rows_kept": len(keep),
                        "rows_dropped": dict(sorted(here.items()))})
        kept_parts.append(kept_rows.remove_columns(list(_META)))
    kept = kept_parts[0] if len(kept_parts) == 1 else concatenate_datasets(kept_parts)
    return _Tally(kept, rows_in, dropped, truncated, realigned, problems, sources)


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


def _split(train, cfg: Config):
    """Hold out val_set_size rows, chosen by cfg.seed; both parts keep the file order."""
    import numpy as np

    n = len(train)
    size = cfg.val_set_size
    n_eval = int(size) if size >= 1 else math.ceil(n * size)
    if n_eval >= n:
        raise UserError.single("val_set_size", f"holds out {n_eval} of the {n} usable rows, leaving none to train on",
                               "lower val_set_size (a fraction < 1, or a row count)")
    order = np.random.default_rng(cfg.seed).permutation(n)
    return _select(train, sorted(order[n_eval:].tolist())), _select(train, sorted(order[:n_eval].tolist()))


def _no_rows_error(key: str, tally: _Tally) -> UserError:
    why = ", ".join(f"{r} {c}" for r, c in tally.dropped.most_common()) or "the data is empty"
    return UserError.single(key, f"no usable rows ({tally.rows_in} read; dropped: {why})",
                            "fix the data (strict_data: true lists every bad row as FILE:LINE)")


def _build(cfg: Config, tokenizer, train_srcs, eval_srcs, tmp: Path):
    settings = TokenizeSettings(sequence_len=cfg.sequence_len, excess_length_strategy=cfg.excess_length_strategy,
                                train_on_inputs=cfg.train_on_inputs, chat_template=cfg.chat_template)
    work = tmp / "_work"
    work.mkdir()
    train_parts = [(s, _tokenize_source(s, tokenizer, settings, work, f"train{i}")) for i, s in enumerate(train_srcs)]
    eval_parts = [(s, _tokenize_source(s, tokenizer, settings, work, f"eval{i}")) for i, s in enumerate(eval_srcs)]
    t = _tally(train_parts, cfg.strict_data)
    e = _tally(eval_parts, cfg.strict_data) if eval_parts else None
    problems = t.problems + (e.problems if e else [])
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
    if ev is None and cfg.val_set_size > 0:
        train, ev = _split(train, cfg)
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
        "sources": t.sources + (e.sources if e else []),
    }


# ================================================================ entry point

def eval_packing(cfg: Config) -> bool:
    return cfg.sample_packing if cfg.eval_sample_packing is None else cfg.eval_sample_packing


def prepare_data(cfg: Config, tokenizer, *, progress: bool = True) -> PreparedData:
    """Tokenized, masked, validated train (and eval) data, from the cache when it has them.

    Raises UserError naming the key (datasets.N.path, val_set_size, ...) or FILE:LINE.
    """
    check_tokenizer(tokenizer)
    train_srcs = [resolve_source(ds, f"datasets.{i}") for i, ds in enumerate(cfg.datasets)]
    eval_srcs = [resolve_source(ds, f"test_datasets.{i}") for i, ds in enumerate(cfg.test_datasets or [])]
    key, material = cache.cache_key(cfg, tokenizer, [s.describe() for s in train_srcs + eval_srcs])
    root = cache.cache_root(cfg)
    entry = (root / key).resolve()
    hit = cache.load(entry)
    if hit is None:
        with _progress_bars(progress), cache.staging(root, key) as tmp:
            stats = _build(cfg, tokenizer, train_srcs, eval_srcs, tmp)
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
    # Packing runs after the cache, so turning it on or off never re-tokenizes.
    if cfg.sample_packing:
        train = pack_dataset(train, cfg.sequence_len, seed=cfg.seed)
        stats["packing"] = {"train": packing_stats(train, cfg.sequence_len)}
    if ev is not None and eval_packing(cfg):
        ev = pack_dataset(ev, cfg.sequence_len, seed=cfg.seed)
        stats.setdefault("packing", {})["eval"] = packing_stats(ev, cfg.sequence_len)
    dropped = {r: n for r, n in stats["rows_dropped"].items() if n}
    log.info("data: %d train rows, %d eval rows, %d tokens (cache %s: %s)%s", stats["train_rows"],
             stats["eval_rows"], stats["tokens"], state, entry,
             f"; dropped {dropped}" if dropped else "")
    return PreparedData(train=train, eval=ev, stats=stats)


__all__ = ["PreparedData", "prepare_data", "render_prompt", "encode_prompt", "DataCollator",
           "IGNORE_INDEX", "DROP_REASONS", "STATS_KEYS", "resolve_source"]
