"""Sample packing: several tokenized rows (documents) per `sequence_len` row, exactly.

    packed = pack_dataset(train, sequence_len=1024, seed=42)
    packed[0]  # {"input_ids", "labels", "position_ids", "length", "num_docs"}
    packing_stats(packed, 1024)  # {"packed_rows", "efficiency", "doc_length_histogram", ...}

What makes a packed row equal to its documents run one by one:

- position_ids restart at 0 for every document. With `attention_mask=None` and no KV cache,
  transformers reads the restarts (`masking_utils.find_packed_sequence_indices`: a new document
  wherever a position is not the previous one + 1) and builds a block-diagonal causal mask for
  eager and sdpa attention, sliding windows included. The collator therefore drops the
  attention mask of packed batches and says `use_cache=False` (collate.py).
- No label predicts across a boundary: the first label of every document is -100. Causal LM
  losses shift by one (the logit at t scores label t+1), so the label at a document's first
  token would otherwise be predicted from the last token of the previous document. Unpacked, a
  row's first label is never a target either (nothing precedes it): the objectives agree.
- Layers that keep state along the sequence (Qwen 3.5's Gated DeltaNet: a convolution and a
  recurrent state) ignore both masks and positions; families with such layers need the patch in
  `archtune.patches.packing` before they may pack.

The bins. Best-fit decreasing (the tightest open row that still fits each document, longest
documents first): the same O(n log L) cost as first-fit decreasing, and never a worse fill
(both are within 11/9 of optimal; on a realistic mix of many short and a few long documents
both leave < 2% padding). Deterministic under `seed`: documents are shuffled with it before a
stable sort by length (equal lengths keep the shuffled order), and the finished rows are
shuffled with it again, so rows of similar size are not adjacent. `window` packs each run of
`window` shuffled documents on its own (bounded memory of open rows, more mixing between
epochs of data); the default packs all at once, which fills best. The rows are fixed once
packed; the Trainer's sampler shuffles their order each epoch (its own seed), as for unpacked
data.
"""
from __future__ import annotations

import bisect
import hashlib
from typing import TYPE_CHECKING

import numpy as np

from archtune.data.tokenize import IGNORE_INDEX

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

PACKED_COLUMNS: tuple[str, ...] = ("input_ids", "labels", "position_ids", "length", "num_docs")


# ================================================================ bins

def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= capacity, longest first.

    Each item goes into the open bin with the least room that still fits it (a new bin when none
    fits). Items are taken in order of decreasing length; equal lengths keep their input order.

    >>> best_fit_decreasing(np.array([3, 8, 2, 5, 2]), capacity=10)
    [[1, 4], [3, 0, 2]]
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    # Open bins by remaining room: `rooms` is the sorted list of rooms some bin has, `by_room`
    # the bins with that room. A bisect finds the tightest fit.
    rooms: list[int] = []
    by_room: dict[int, list[int]] = {}
    for i in order.tolist():
        size = int(lengths[i])
        at = bisect.bisect_left(rooms, size)
        if at < len(rooms):
            room = rooms[at]
            b = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                del rooms[at]
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        left = room - size
        if left > 0:  # a full bin takes no more items
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(b)
    return bins


def plan_bins(lengths, sequence_len: int, seed: int = 42, *, window: int | None = None) -> list[np.ndarray]:
    """The packed rows as arrays of document indices, deterministic under `seed`.

    Documents are shuffled with `seed`, packed (best-fit decreasing, all at once or `window` at a
    time), and the rows shuffled with `seed`. Zero-length documents are left out; a document
    longer than `sequence_len` is a ValueError (the data pipeline drops or truncates those).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if sequence_len < 1:
        raise ValueError(f"sequence_len must be >= 1, got {sequence_len}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 (or None for all documents at once), got {window}")
    too_long = np.flatnonzero(lengths > sequence_len)
    if too_long.size:
        raise ValueError(f"{too_long.size} documents are longer than sequence_len={sequence_len} "
                         f"(the longest: {int(lengths.max())} tokens, row {int(too_long[0])})")
    rng = np.random.default_rng(seed)
    docs = rng.permutation(lengths.size)
    docs = docs[lengths[docs] > 0]
    step = docs.size if window is None else window
    rows: list[np.ndarray] = []
    for start in range(0, docs.size, max(step, 1)):
        part = docs[start:start + step]
        rows += [part[np.asarray(b)] for b in best_fit_decreasing(lengths[part], sequence_len)]
    return [rows[i] for i in rng.permutation(len(rows))]


# ================================================================ rows

def _doc_lengths(ds) -> np.ndarray:
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]
    return pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)


def _list_array(offsets: np.ndarray, values: np.ndarray):
    import pyarrow as pa

    if offsets[-1] <= np.iinfo(np.int32).max:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))


def pack_dataset(ds: "Dataset", sequence_len: int, seed: int = 42, *, window: int | None = None) -> "Dataset":
    """Pack the rows (documents) of `ds` into rows of at most `sequence_len` tokens.

    `ds` has input_ids and labels (-100 = no loss), as `prepare_data` writes them; its other
    columns are dropped. Each packed row holds whole documents, one after another:

        input_ids     the documents' ids, concatenated
        labels        their labels, with the first label of every document set to -100
        position_ids  0, 1, ... restarting at every document
        length        real tokens in the row (<= sequence_len; rows are not padded)
        num_docs      documents in the row

    Deterministic under `seed` (see `plan_bins`); every document lands in exactly one row.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset

    missing = {"input_ids", "labels"} - set(ds.column_names)
    if missing:
        raise ValueError(f"pack_dataset needs columns input_ids and labels; missing {sorted(missing)}")
    lengths = _doc_lengths(ds)
    rows = plan_bins(lengths, sequence_len, seed, window=window)
    order = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    docs_per_row = np.fromiter((r.size for r in rows), dtype=np.int64, count=len(rows))

    table = ds.select_columns(["input_ids", "labels"]).with_format("arrow")[:]
    take = pa.array(order)
    ids = pc.take(table.column("input_ids"), take).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    labels = pc.take(table.column("labels"), take).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    labels = labels.astype(np.int64, copy=True)
    doc_len = lengths[order]
    if ids.size != doc_len.sum() or labels.size != ids.size:
        raise ValueError("input_ids and labels differ in length in some row")

    # Document starts in the flat token array; positions count from each start.
    doc_start = np.zeros(doc_len.size, dtype=np.int64)
    np.cumsum(doc_len[:-1], out=doc_start[1:])
    labels[doc_start] = IGNORE_INDEX  # nothing predicts a document's first token
    positions = np.arange(ids.size, dtype=np.int64) - np.repeat(doc_start, doc_len)

    # Row boundaries: every row is a run of whole documents.
    first_doc = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(docs_per_row, out=first_doc[1:])
    row_offsets = np.append(doc_start, ids.size)[first_doc]
    row_len = np.diff(row_offsets)

    packed = pa.table({
        "input_ids": _list_array(row_offsets, ids.astype(np.int64, copy=False)),
        "labels": _list_array(row_offsets, labels),
        "position_ids": _list_array(row_offsets, positions),
        "length": pa.array(row_len, pa.int64()),
        "num_docs": pa.array(docs_per_row, pa.int64()),
    })
    # An explicit fingerprint: datasets would otherwise hash every token of the table.
    source = getattr(ds, "_fingerprint", None) or f"{len(ds)}-{int(lengths.sum())}"
    key = hashlib.sha256(f"{source}|packed|{sequence_len}|{seed}|{window}".encode()).hexdigest()[:16]
    return Dataset(packed, fingerprint=key)


# ================================================================ statistics

def _histogram_edges(sequence_len: int) -> list[int]:
    edges = [0]
    edge = 16
    while edge < sequence_len:
        edges.append(edge)
        edge *= 2
    return edges + [sequence_len]


def doc_length_histogram(doc_lengths, sequence_len: int) -> dict[str, int]:
    """Documents per length range, ranges doubling from 16 up to sequence_len.

    >>> doc_length_histogram([3, 16, 17, 100], 128)
    {'1-16': 2, '17-32': 1, '33-64': 0, '65-128': 1}
    """
    edges = _histogram_edges(sequence_len)
    counts, _ = np.histogram(np.asarray(doc_lengths, dtype=np.int64), bins=np.asarray(edges) + 0.5)
    return {f"{lo + 1}-{hi}": int(n) for lo, hi, n in zip(edges[:-1], edges[1:], counts)}


def packing_stats(packed: "Dataset", sequence_len: int) -> dict:
    """JSON-able statistics of a packed data set (as `pack_dataset` writes it).

    packed_rows; docs; tokens (real tokens); efficiency = tokens / (packed_rows x sequence_len),
    the share of each row that is not padding; docs_per_row (mean); doc_length_histogram
    (document lengths, read back from the position_ids).
    """
    import pyarrow.compute as pc

    table = packed.select_columns(["position_ids", "length", "num_docs"]).with_format("arrow")[:]
    rows = table.num_rows
    tokens = int(pc.sum(table.column("length")).as_py() or 0)
    docs = int(pc.sum(table.column("num_docs")).as_py() or 0)
    positions = pc.list_flatten(table.column("position_ids")).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(positions == 0)
    doc_lengths = np.diff(np.append(starts, positions.size))
    return {
        "packed_rows": rows,
        "docs": docs,
        "tokens": tokens,
        "sequence_len": sequence_len,
        "efficiency": round(tokens / (rows * sequence_len), 6) if rows else 0.0,
        "docs_per_row": round(docs / rows, 3) if rows else 0.0,
        "doc_length_histogram": doc_length_histogram(doc_lengths, sequence_len),
    }


__all__ = ["PACKED_COLUMNS", "best_fit_decreasing", "plan_bins", "pack_dataset", "packing_stats",
           "doc_length_histogram"]
