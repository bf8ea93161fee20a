"""Where a `datasets:` entry's rows come from: local files (by extension or `ds_type`), a
directory of them, or a hub id; `resolve_source` checks that they exist before anything is read."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from archtune.config.schema import DatasetConfig
from archtune.data import cache
from archtune.errors import UserError

EXTENSIONS: dict[str, str] = {
    ".json": "json", ".jsonl": "json", ".ndjson": "json", ".jsonlines": "json",
    ".parquet": "parquet", ".pq": "parquet", ".csv": "csv",
}

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
            name = split_name(ds.split, key)
            if name not in splits:
                raise UserError.single(
                    f"{key}.split", f"{root} has no files for split {name!r} (it has: {', '.join(sorted(splits))})",
                    f"set {key}.split to one of them, or name the files with {key}.data_files")
            found = list(DataFilesDict.from_patterns({name: splits[name]}, base_path=str(root))[name])
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


def split_name(split: str, key: str) -> str:
    """`train[:10%]` -> `train` (a split name with an optional slice, datasets' syntax)."""
    from datasets import ReadInstruction

    try:
        ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as exc:
        raise UserError.single(f"{key}.split", f"{split!r} is not a split: {exc}",
                               "write a split name with an optional slice: train, train[:10%], train[:100], "
                               "train[10%:20%]") from None
    return split.split("[", 1)[0]


def slice_rows(raw, split: str):
    """The rows `split`'s slice selects (datasets' rule: percentages rounded to the closest row),
    or all rows when it has none. Local files: the slice applies to the files of the split
    together, in order."""
    from datasets import ReadInstruction

    if "[" not in split:
        return raw
    name = split.split("[", 1)[0]
    (absolute,) = ReadInstruction.from_spec(split).to_absolute({name: len(raw)})
    return raw.select(range(absolute.from_ or 0, len(raw) if absolute.to is None else absolute.to))


def resolve_source(ds: DatasetConfig, key: str) -> Source:
    """Which files an entry reads (nothing is read yet), or that it is a hub data set.

    A local path that exists is read; one that does not but looks like a path (absolute,
    ./, ~, a data file extension, two or more slashes) is an error; anything else is a hub
    id. `split` chooses files inside a directory (train.jsonl / test.jsonl, as datasets
    names them) and is ignored for a single file."""
    path = Path(ds.path).expanduser()
    split_name(ds.split, key)  # a malformed split is a config error, whatever the source
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
