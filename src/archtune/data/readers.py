"""Reading a source's rows as written, one record at a time.

JSON/JSONL and CSV files are read here, line by line, rather than by `datasets.load_dataset`:
one bad line must cost one row, not the run, and a row's problems are reported as FILE:LINE
with the line it started on. Rows reach the formatter exactly as written (Arrow would unify
the schemas of all rows first, adding null keys and failing on a field whose type varies).
Parquet files and hub data sets go through `datasets.load_dataset`; their rows are named
FILE:row N.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Iterator

from archtune.data import row_errors
from archtune.data.sources import Source
from archtune.errors import UserError

_CHUNK_ROWS = 100_000

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
                rows.add(f"{shown}:{lineno}", None, row_errors.UNDECODABLE, _undecodable_detail(exc))


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
            rows.add(f"{shown}:{line}", None, row_errors.UNDECODABLE, "invalid UTF-8 bytes in the row")
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
                rows.add(f"{shown}:{start}", None, row_errors.BAD_JSON, f"unreadable CSV record: {exc}")
                break
            end = reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            if _SURROGATES.search("".join(record)):
                rows.add(f"{shown}:{start}", None, row_errors.UNDECODABLE, "invalid UTF-8 bytes in the record")
                continue
            rows.add(f"{shown}:{start}", json.dumps(dict(zip(header, record)), ensure_ascii=False))


def _load_dataset_error(src: Source, what: str, exc: Exception) -> UserError:
    return UserError.single(f"{src.key}.path", f"could not read {what}: {type(exc).__name__}: {exc}",
                            f"check {src.key}.path (and name, split, data_files)")


def read_source(src: Source, work: Path) -> Iterator[tuple[object, str]]:
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
