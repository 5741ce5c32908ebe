"""One batch from the processor's one-row outputs, without running the processor again.

Every request is prepared alone (its prompt and media through the stock processor, in the caller's thread); a batch
of them is the rows' tensors put together the way the processor would have built them: token-level tensors
([1, L_i]) left-padded to the longest row, everything else (pixels, grids, image sizes) concatenated along its first
dimension, in row order. Where that is not what the processor does (LLaVA images tiled into different numbers of
patches are padded to the most by the processor), `collate` returns None and the caller runs the processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

TOKEN_PADDING = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0}
"""Token-level inputs -> the value their left padding holds (None: the tokenizer's pad id)."""


def collate(rows: Sequence[dict[str, Any]], pad_token_id: int | None) -> dict[str, Any] | None:
    """rows: one-row processor outputs (same keys); returns their left-padded batch, or None where the rows cannot
    be put together without the processor (a non-token tensor whose trailing shapes differ between rows, or no pad
    id). A token-level key not in `TOKEN_PADDING` is concatenated when its rows have one length, else refused."""
    keys = rows[0].keys()
    if pad_token_id is None or any(row.keys() != keys for row in rows):
        return None
    length = max(row["input_ids"].shape[1] for row in rows)
    batch: dict[str, Any] = {}
    for key in keys:
        values = [row[key] for row in rows]
        if key in TOKEN_PADDING:
            fill = pad_token_id if TOKEN_PADDING[key] is None else TOKEN_PADDING[key]
            batch[key] = torch.cat([_left_pad(value, length, fill) for value in values])
        elif all(isinstance(value, torch.Tensor) for value in values):
            if len({value.shape[1:] for value in values}) > 1:
                return None
            batch[key] = torch.cat(values)
        elif all(isinstance(value, list) for value in values):
            batch[key] = [item for value in values for item in value]
        else:
            return None
    return batch


def _left_pad(tokens: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    """tokens [1, L] -> [1, length], `fill` before the row's own tokens."""
    return torch.nn.functional.pad(tokens, (length - tokens.shape[1], 0), value=fill)
