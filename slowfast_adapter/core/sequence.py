"""Fit a token sequence to fewer visual placeholders, keeping every per-token tensor aligned.

Visual items (videos, images) occupy runs of placeholder tokens; items are consumed in row-major
order, exactly as `masked_scatter` fills them. All functions here are vectorised over the batch.
"""

from __future__ import annotations

import torch


def placeholder_item_rows(
    input_ids: torch.Tensor, token_id: int, item_lengths: torch.Tensor, *, what: str
) -> torch.Tensor:
    """The batch row of each visual item.

    input_ids: [B, L]; item_lengths: [items], placeholder count of each item in row-major order.
    Returns [items] row indices. Raises if the placeholder count does not match the items.
    """
    positions = (input_ids == token_id).nonzero()  # [n_tokens, 2], row-major
    expected = int(item_lengths.sum())
    if positions.shape[0] != expected:
        raise ValueError(
            f"The text holds {positions.shape[0]} {what} placeholder tokens but the {what} inputs need "
            f"{expected} ({item_lengths.tolist()} per item). Build the inputs with the base model's own "
            f"processor from the same text and {what}s, and do not truncate the prompt."
        )
    if item_lengths.numel() == 0:
        return item_lengths.new_zeros(0)
    ends = item_lengths.cumsum(0).to(positions.device)
    starts = ends - item_lengths.to(positions.device)
    rows = positions[starts, 0]
    if not torch.equal(rows, positions[ends - 1, 0]):
        raise ValueError(f"A {what}'s placeholder tokens span two samples of the batch: the inputs are corrupt.")
    return rows


def placeholder_keep_mask(
    input_ids: torch.Tensor, token_id: int, native_lengths: torch.Tensor, kept_lengths: torch.Tensor
) -> torch.Tensor:
    """[B, L] bool: True for tokens to keep when item i keeps only its first `kept_lengths[i]` placeholders."""
    is_placeholder = input_ids == token_id
    keep = ~is_placeholder
    if native_lengths.numel() == 0:
        return keep
    device = input_ids.device
    native_lengths, kept_lengths = native_lengths.to(device), kept_lengths.to(device)
    if bool((kept_lengths > native_lengths).any()):
        raise ValueError("An item cannot keep more placeholder tokens than it has.")
    rank = torch.arange(int(is_placeholder.sum()), device=device)  # row-major rank of each placeholder
    ends = native_lengths.cumsum(0)
    item = torch.searchsorted(ends, rank, right=True)
    offset = rank - (ends - native_lengths)[item]
    keep[is_placeholder] = offset < kept_lengths[item]
    return keep


def padding_side(attention_mask: torch.Tensor | None) -> str:
    """'left' if any row of a [B, L] mask starts with padding, else 'right'."""
    if attention_mask is None:
        return "left"
    starts_padded = (attention_mask[:, 0] == 0) & (attention_mask.sum(-1) > 0)
    return "left" if bool(starts_padded.any()) else "right"


def compact_tokens(
    keep: torch.Tensor,
    tensors: dict[str, tuple[torch.Tensor | None, int]],
    *,
    side: str,
) -> dict[str, torch.Tensor | None]:
    """Drop the tokens where `keep` [B, L] is False and re-pad the rows on `side`.

    tensors: name -> (tensor with the sequence as its last dim, pad value). A leading batch dim is
    required; extra leading dims (e.g. 3-D position ids [3, B, L]) are kept. Returns the compacted
    tensors under the same names (None stays None); pass the attention mask among `tensors` (pad 0) to
    compact it too.
    """
    batch, length = keep.shape
    new_lengths = keep.sum(-1)  # [B]
    new_length = int(new_lengths.max()) if batch else 0
    target = keep.long().cumsum(-1) - 1  # [B, L] destination column of each kept token
    if side == "left":
        target = target + (new_length - new_lengths)[:, None]
    rows = torch.arange(batch, device=keep.device)[:, None].expand(batch, length)[keep]
    cols = target[keep]
    out: dict[str, torch.Tensor | None] = {}
    for name, (tensor, pad_value) in tensors.items():
        if tensor is None:
            out[name] = None
            continue
        lead = tensor.shape[:-2]
        result = tensor.new_full((*lead, batch, new_length), pad_value)
        result[..., rows, cols] = tensor[..., keep]
        out[name] = result
    return out


def fit_sequence(
    keep: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    pad_token_id: int,
    others: dict[str, tuple[torch.Tensor | None, int]] | None = None,
) -> dict[str, torch.Tensor | None]:
    """Keep the real tokens where `keep` [B, L] is True and re-pad on the side the batch was padded on.

    Returns `input_ids`, `attention_mask` and every entry of `others` (name -> (tensor, pad value)),
    all fitted to the new length, which is the longest row's count of kept real tokens.
    """
    side = padding_side(attention_mask)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    tensors = {"input_ids": (input_ids, pad_token_id), "attention_mask": (attention_mask, 0), **(others or {})}
    return compact_tokens(keep & attention_mask.bool(), tensors, side=side)


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] position ids counting only real tokens (padding gets 0), as `generate` builds them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def item_start_positions(
    input_ids: torch.Tensor,
    keep: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_id: int,
    item_lengths: torch.Tensor,
) -> torch.Tensor:
    """[items] the position id (`mask_positions` of the fitted sequence) of each item's first placeholder.

    input_ids, keep, attention_mask: [B, L] before `fit_sequence(keep, ...)`; item_lengths: [items] each item's
    placeholder count in `input_ids`, in row-major order (as `placeholder_item_rows` reads them)."""
    real = keep if attention_mask is None else keep & attention_mask.bool()
    positions = real.long().cumsum(-1) - 1  # a kept real token's position id in the fitted sequence
    where = (input_ids == token_id).nonzero()  # [n, 2], row-major
    starts = (item_lengths.cumsum(0) - item_lengths).to(where.device)
    first = where[starts]
    return positions[first[:, 0], first[:, 1]]


def temporal_positions(start: torch.Tensor | float, span: float, units: int, tokens_per_unit: int) -> torch.Tensor:
    """[units * tokens_per_unit] float: unit u's tokens all at `start + u * span / units` (a video's frames spread
    evenly over the `span` positions its fast tokens take in the sequence, one position per frame)."""
    times = torch.arange(units, dtype=torch.float32) * (span / units)
    return (times + torch.as_tensor(start, dtype=torch.float32).cpu()).repeat_interleave(tokens_per_unit)
