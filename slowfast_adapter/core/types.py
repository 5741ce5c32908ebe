"""Data types shared by several layers: slow tokens, prepared inputs, encoded video features.

The bottom layer of the package: it imports nothing from slowfast_adapter, so every other module may use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch


class PackedKeys(NamedTuple):
    """The real keys of a padded [B, S] key mask, packed row after row (flash-attn's varlen layout).

    lengths: [B] int32, real keys per row; index: [N] long, their flat positions b * S + s in row order."""

    lengths: torch.Tensor
    index: torch.Tensor

    @classmethod
    def from_mask(cls, key_padding_mask: torch.Tensor) -> PackedKeys:
        """From a [B, S] mask (one host sync, once per call: the index has a data-dependent length)."""
        return cls(key_padding_mask.sum(-1, dtype=torch.int32), key_padding_mask.flatten().nonzero().squeeze(1))


@dataclass(frozen=True)
class SlowItem:
    """One video's (or image's) slow tokens inside `SlowTokens`: tokens[row, start : start + length].

    key: the video's fingerprint when its features may come from (or go to) an `EncodedVideos` cache.
    units: a video's frames (or temporal groups of frames), each `length // units` consecutive tokens; 0 for an
    image's tokens (read by "where it looked", `frame_attention.py`)."""

    row: int
    start: int
    length: int
    key: str | None = None
    units: int = 0


class SlowItemTokens(NamedTuple):
    """One video's (or image's) slow tokens [S_i, D] for sample `row`, before packing (see `SlowItem`); positions:
    [S_i] (1-D RoPE) or [3, S_i] (M-RoPE: temporal, height, width) float, each token's RoPE position as a slow key
    (`SlowFastConfig.slow_key_positions`), or None."""

    row: int
    tokens: torch.Tensor
    key: str | None = None
    units: int = 0
    positions: torch.Tensor | None = None


@dataclass
class SlowTokens:
    """The slow tokens of a batch, padded: tokens [B, S, D], mask [B, S] (True = real token; each row's real
    tokens come first).

    items: where each video's (or image's) tokens sit, in row order; by default one item per row holding the
    row's leading real tokens. key_positions: [B, S] (1-D RoPE) or [3, B, S] (M-RoPE, axes first like the LLM's
    `position_ids`) float, each slow key's RoPE position (0 on padding), or None (no positional encoding on the slow
    keys); key_rope: its (cos, sin) [B, S, hd] from the LLM's rotary embedding,
    set by the family. Slow K/V are projected item by item, so a video's K/V do not depend on the
    batch it is in (and can be cached, see `encoded.py`).

    Derived once here, so a decode step reads them without a host sync (and `torch.compile` sees plain fields):
    has_slow [B] bool, the sample has at least one slow token; attend_mask [B, S], the key mask with no empty row
    (empty samples' outputs are zeroed by the caller); padded, whether any row of it has a False (else attention
    runs with no mask at all). The packed real keys flash-attn's varlen kernel needs are built on first use only
    (`packed_keys()`).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    items: list[SlowItem] | None = None
    key_positions: torch.Tensor | None = None
    key_rope: tuple[torch.Tensor, torch.Tensor] | None = None
    has_slow: torch.Tensor = field(init=False, repr=False)
    attend_mask: torch.Tensor = field(init=False, repr=False)
    padded: bool = field(init=False, repr=False)
    _packed_keys: PackedKeys | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        counts = self.mask.sum(-1)
        if self.items is None:
            self.items = [SlowItem(row, 0, int(count)) for row, count in enumerate(counts.tolist()) if count]
        self.has_slow = counts > 0
        self.attend_mask = self.mask.clone()
        self.attend_mask[:, 0] |= ~self.has_slow
        self.padded = not bool(self.attend_mask.all())

    def packed_keys(self) -> PackedKeys | None:
        """The real keys of a padded batch, packed for flash-attn's varlen kernel (None when no row is padded); built
        once, on the first flash-attn call (the eager prefill), so decode steps read a field (no host sync)."""
        if self.padded and self._packed_keys is None:
            self._packed_keys = PackedKeys.from_mask(self.attend_mask)
        return self._packed_keys

    @property
    def kernel_mask(self) -> torch.Tensor | None:
        """`attend_mask` where some row is padded, else None: the attention kernels run unmasked then."""
        return self.attend_mask if self.padded else None

    @classmethod
    def pack(cls, items: list[SlowItemTokens], batch_size: int) -> SlowTokens | None:
        """Concatenate per-item slow tokens by sample row; None when there are no items."""
        if not items:
            return None
        with_positions = [item.positions is not None for item in items]
        if any(with_positions) and not all(with_positions):
            raise ValueError("Either every slow item has key positions or none has.")
        if batch_size == 1 and len(items) == 1:  # one video (the long-video case): a view, no copy
            row, tokens, key, units, positions = items[0]
            mask = torch.ones(1, tokens.shape[0], dtype=torch.bool, device=tokens.device)
            positions = None if positions is None else positions.unsqueeze(-2).to(tokens.device)  # [..., 1, S]
            return cls(tokens[None], mask, [SlowItem(row, 0, tokens.shape[0], key, units)], positions)
        items = sorted(items, key=lambda item: item.row)  # stable: keeps each sample's items in order
        rows = torch.tensor([item.row for item in items])
        lengths = torch.tensor([item.tokens.shape[0] for item in items])
        flat = torch.cat([item.tokens for item in items])  # [N, D]
        sample = rows.repeat_interleave(lengths)  # [N]
        per_row = torch.bincount(rows, weights=lengths, minlength=batch_size).long()
        starts = per_row.cumsum(0) - per_row
        slot = torch.arange(flat.shape[0]) - starts[sample]
        tokens = flat.new_zeros(batch_size, int(per_row.max()), flat.shape[-1])
        mask = torch.zeros(batch_size, tokens.shape[1], dtype=torch.bool, device=flat.device)
        sample, slot = sample.to(flat.device), slot.to(flat.device)
        tokens[sample, slot] = flat
        mask[sample, slot] = True
        key_positions = None
        if all(with_positions):
            axes = items[0].positions.shape[:-1]  # () for 1-D RoPE, (3,) for M-RoPE
            key_positions = torch.zeros(*axes, batch_size, tokens.shape[1], device=flat.device)
            every = torch.cat([item.positions.float().to(flat.device) for item in items], dim=-1)  # [..., N]
            key_positions[..., sample, slot] = every
        placed, cursor = [], [0] * batch_size
        for (row, _, key, units, _), length in zip(items, lengths.tolist(), strict=True):
            placed.append(SlowItem(row, cursor[row], length, key, units))
            cursor[row] += length
        return cls(tokens, mask, placed, key_positions)


@dataclass
class VideoFeatures:
    """One video encoded by the base's vision tower and projector (before fast pooling).

    native: the family's per-video features (LLaVA: [T*h*w + 1, D] with the newline token; Qwen: the merged
    tokens [N, D] and, for Qwen3-VL, `extra` holds the deepstack features per layer [N, D]).
    output_type: the class of the base's `get_video_features` output, to rebuild one from cached videos.
    """

    native: torch.Tensor
    extra: list[torch.Tensor] = field(default_factory=list)
    output_type: Any = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.native, *self.extra])


@dataclass
class PreparedInputs:
    """Base-model inputs with fast tokens in the sequence, and the slow tokens beside it.

    model_inputs: keyword arguments for the base model's `forward` / `generate` (the sequence is fitted
    to the fast token count; labels and attention mask stay aligned).
    input_ids: [B, L'] the fitted sequence; visual_mask: [B, L'] True on visual placeholder tokens.
    slow: the slow tokens of every sample, or None when the batch has none.
    """

    model_inputs: dict[str, Any]
    input_ids: torch.Tensor
    visual_mask: torch.Tensor
    slow: SlowTokens | None


@dataclass(frozen=True)
class VideoLayout:
    """How one square video enters a family's model (FLOP counting; no pixels needed).

    units: frames (LLaVA) or temporal groups of frames (Qwen) the vision tower encodes; grid: native video
    tokens per unit (h, w) after the base's own pooling / merging; newline_tokens: tokens a video adds once
    (LLaVA's newline); text_tokens_per_unit: text the processor writes per unit (Qwen3-VL timestamps and
    vision start/end); image_size: the frame size in px the layout assumes (None: fixed by the model).
    """

    units: int
    unit_name: str
    grid: tuple[int, int]
    newline_tokens: int
    text_tokens_per_unit: int
    image_size: int | None


class SlowKVCache(Protocol):
    """Where a call's slow K/V may come from and go to (`encoded.EncodedVideos`), keyed by (adapter module id, layer
    index, video fingerprint), each entry the video's (key, value) [H_kv, S_i, hd]; `parameters`: the tensors the K/V
    were projected with (an entry is stale once they change)."""

    def cached_kv(
        self, key: tuple[int, int, str], parameters: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def store_kv(
        self, key: tuple[int, int, str], kv: tuple[torch.Tensor, torch.Tensor], parameters: list[torch.Tensor]
    ) -> None: ...
