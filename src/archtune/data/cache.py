"""The preprocessing cache: tokenized data sets keyed by everything that shapes their tokens.

`<dataset_prepared_path>/<sha256>/` holds `train/` (and `eval/`) written by
`Dataset.save_to_disk`, `stats.json` and `key.json` (what was hashed, for debugging). The
sha256 covers the bytes of every data file read (a hub data set: its id, name, split and
data_files), the tokenizer (its backend serialisation, chat template and special tokens)
and the config keys in `TOKEN_KEYS`; nothing else (learning_rate, output_dir, ... do not
matter). A directory is built under a temporary name and renamed into place, so a crash
never leaves a half-written entry and two processes preparing the same data at once both
end up reading one complete copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# Bump when the tokenization code changes what it produces for the same inputs.
CACHE_VERSION = 3  # 2: rows keep their "source" (FILE:LINE); 3: alpaca rows carry Axolotl's system line
TOKEN_KEYS: tuple[str, ...] = (
    "datasets", "test_datasets", "val_set_size", "seed", "sequence_len", "excess_length_strategy",
    "strict_data", "train_on_inputs", "chat_template", "eot_tokens", "special_tokens")
STATS_FILE = "stats.json"


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what makes a tokenizer produce its ids (not where it was loaded from)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body: Any = backend.to_str()
    else:  # a slow (Python) tokenizer: its vocabulary and the class that applies it
        body = sorted(tokenizer.get_vocab().items())
    material = {
        "class": type(tokenizer).__name__,
        "backend": body,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": _jsonable(getattr(tokenizer, "special_tokens_map", {})),
        "special_ids": [getattr(tokenizer, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id")],
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
        "probe": list(tokenizer("a", add_special_tokens=True)["input_ids"]),
    }
    return _sha(material)


def config_material(cfg) -> dict:
    """The TOKEN_KEYS of the config as written (hashed: what the user wrote that shapes tokens)."""
    data = cfg.model_dump(mode="json")
    return {k: data.get(k) for k in TOKEN_KEYS}


def cache_key(cfg, tokenizer, sources: list[dict]) -> tuple[str, dict]:
    """(sha256 hex, the material it was computed from). `sources`: one JSON-able dict per
    dataset entry, holding the file digests (see `archtune.data._describe_source`)."""
    material = {"version": CACHE_VERSION, "config": config_material(cfg), "sources": sources,
                "tokenizer": tokenizer_fingerprint(tokenizer)}
    return _sha(material), material


def load(entry: Path, in_memory: bool = False):
    """(train, eval, stats) from a complete cache entry, or None (missing or unreadable).
    `in_memory`: read the tables into memory (the entry may be deleted afterwards)."""
    from datasets import load_from_disk

    if not (entry / STATS_FILE).is_file() or not (entry / "train").is_dir():
        return None
    try:
        stats = json.loads((entry / STATS_FILE).read_text())
        train = load_from_disk(str(entry / "train"), keep_in_memory=in_memory)
        ev = load_from_disk(str(entry / "eval"), keep_in_memory=in_memory) if (entry / "eval").is_dir() else None
    except Exception:  # damaged by hand: rebuilt by the caller
        return None
    return train, ev, stats


@contextmanager
def staging(root: Path, key: str) -> Iterator[Path]:
    """A temporary directory beside the final one; removed if the block fails."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit(tmp: Path, entry: Path) -> None:
    """Move a finished staging directory into place (atomic rename).

    If another process finished the same entry first, keep theirs. An existing entry that
    `load` could not read is moved aside first.
    """
    if entry.exists() and load(entry) is None:
        stale = entry.with_name(f".stale-{entry.name}-{os.getpid()}")
        shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(entry, stale)
        except OSError:
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, entry)
    except OSError:
        if load(entry) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def _sha(material: Any) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
