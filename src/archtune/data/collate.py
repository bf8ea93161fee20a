"""Batch rows of (input_ids, labels) into padded tensors.

Right padding: input_ids with the pad id, labels with -100, attention_mask 1 on real
tokens (so `batch["attention_mask"].sum()` counts the real tokens of a batch). Extra
columns (length, ...) are left out; position_ids, when rows carry them (packing), are
padded with 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from archtune.data.tokenize import IGNORE_INDEX


@dataclass
class DataCollator:
    tokenizer: Any = None
    pad_token_id: int | None = None  # default: tokenizer.pad_token_id, else its eos id, else 0
    pad_to_multiple_of: int | None = None  # e.g. 8 for tensor cores
    label_pad_token_id: int = IGNORE_INDEX

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
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        m = self.pad_to_multiple_of
        if m:
            width = -(-width // m) * m
        n = len(features)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), self.label_pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        has_pos = "position_ids" in features[0]
        position_ids = torch.zeros((n, width), dtype=torch.long) if has_pos else None
        for i, (f, k) in enumerate(zip(features, lengths)):
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
            input_ids[i, :k] = ids
            labels[i, :k] = torch.as_tensor(f["labels"], dtype=torch.long) if "labels" in f else ids
            attention_mask[i, :k] = 1
            if position_ids is not None:
                position_ids[i, :k] = torch.as_tensor(f["position_ids"], dtype=torch.long)
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if position_ids is not None:
            batch["position_ids"] = position_ids
        return batch


__all__ = ["DataCollator"]
