"""Batch rows of (input_ids, labels) into padded tensors.

Right padding: input_ids with the pad id, labels with -100.

Unpacked rows: attention_mask is 1 on real tokens (so `batch["attention_mask"].sum()` counts
the real tokens of a batch).

Packed rows (they carry position_ids, see data/packing.py): position_ids are padded with 0 and
the batch has NO attention_mask when the plan says so (`sample_packing_drop_attention_mask`,
`drop_attention_mask` here; true for every model archtune plans). Why not keep it: a 2D mask can only say "padding", not
where one document ends and the next begins, and when a mask is given transformers skips its
packed-sequence detection (`masking_utils.find_packed_sequence_indices` runs only when
attention_mask is None and there is no cache), so every document would attend to the ones
before it in the row. Without the mask, the restarts in position_ids give a block-diagonal
causal mask (eager and sdpa). Right padding needs no mask: a pad (position 0) is a document of
its own that nothing real attends to, and its label is -100. A model that cannot build
document masks from position_ids cannot pack exactly at all, with or without the mask, so the
family refuses packing instead (plan: `sample_packing_drop_attention_mask`). Real tokens of a
packed batch: `input_ids != pad id` (what the Trainer counts when there is no mask).

Rows with images or audio (data/media.py) carry their encoded files and the processor's per-token
type ids: the batch gets the image processor's outputs for every image of its rows, in row order
(pixel_values, image_grid_thw, ...), the feature extractor's for every audio (input_features,
input_features_mask), and the per-token type ids under the names the processor gave them
(token_type_ids, mm_token_type_ids), padded with 0 (text). A batch of text-only rows gets no
media inputs, so batches of text-only and media rows mix freely.

Extra columns (length, num_docs, ...) are left out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from archtune.data.tokenize import IGNORE_INDEX


@dataclass
class DataCollator:
    tokenizer: Any = None
    pad_token_id: int | None = None  # default: tokenizer.pad_token_id, else its eos id, else 0
    pad_to_multiple_of: int | None = None  # e.g. 8 for tensor cores
    pad_to_length: int | None = None  # pad_to_sequence_len: every batch this wide (fixed shapes)
    label_pad_token_id: int = IGNORE_INDEX
    # Packed rows: leave the attention mask out. Required, by keyword: the value is always the plan's
    # (`plan.drop_attention_mask`, from sample_packing_drop_attention_mask), never a default of this class.
    drop_attention_mask: bool = field(kw_only=True)
    media: Any = None  # data.media.MediaProcessor for runs that train on images

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            for name in ("pad_token_id", "eos_token_id"):
                value = getattr(self.tokenizer, name, None)
                if value is not None:
                    self.pad_token_id = int(value)
                    break
            else:
                self.pad_token_id = 0
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError("pad_to_multiple_of must be >= 1")

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DataCollator got an empty batch")
        packed = ["position_ids" in f for f in features]
        if any(packed) and not all(packed):
            raise ValueError("DataCollator got packed rows (with position_ids) and unpacked rows in one batch")
        packed = packed[0]
        lengths = [len(f["input_ids"]) for f in features]
        width = max(max(lengths), self.pad_to_length or 0)
        m = self.pad_to_multiple_of
        if m:
            width = -(-width // m) * m
        n = len(features)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), self.label_pad_token_id, dtype=torch.long)
        keep_mask = not packed or not self.drop_attention_mask
        attention_mask = torch.zeros((n, width), dtype=torch.long) if keep_mask else None
        position_ids = torch.zeros((n, width), dtype=torch.long) if packed else None
        for i, (f, k) in enumerate(zip(features, lengths)):
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
            input_ids[i, :k] = ids
            labels[i, :k] = torch.as_tensor(f["labels"], dtype=torch.long) if "labels" in f else ids
            if packed:
                position_ids[i, :k] = torch.as_tensor(f["position_ids"], dtype=torch.long)
            if keep_mask:
                attention_mask[i, :k] = 1
        batch = {"input_ids": input_ids, "labels": labels}
        if self.media is not None and any("token_types" in f for f in features):
            batch.update(self._media_inputs(features, width))
        if packed:
            batch["position_ids"] = position_ids
        if keep_mask:
            batch["attention_mask"] = attention_mask
        return batch

    def _media_inputs(self, features: list[dict], width: int) -> dict[str, torch.Tensor]:
        types = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            row = f.get("token_types") or []
            types[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        out = {name: types.clone() for name in self.media.token_type_names}
        images = [img for f in features for img in (f.get("images") or [])]
        audios = [wav for f in features for wav in (f.get("audios") or [])]
        if images or audios:
            out.update(self.media.batch_inputs(images, audios))
        return out


__all__ = ["DataCollator"]
