"""Where it looked: how much each hybrid layer's cross-attention, times its gate, put on each frame.

`looking(model)` records the maps of the calls in its block, `where_it_looked(model, inputs, ...)` runs one call and
returns a `FrameAttention`. What the maps hold and how they are computed: docs/internals.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import reduce
from torch import nn

from .attention import slow_attention_mass
from .state import SlowContext
from .types import SlowItem, SlowTokens


@dataclass
class FrameAttention:
    """The per-frame maps of one `forward` or `generate` call.

    layers: the hybrid layers' indices, in the order of `maps`' first dim.
    maps: float32 [num_layers, B, T, F]: cross-attention mass x |gate| per token of the fitted sequence (the prompt
        with fast tokens, then the generated tokens) and frame; 0 for tokens that do not read the slow tokens.
        Row `prompt_length - 1 + k` is the step that produced generated token k (`answer_maps`).
    queried: [B, T] bool, the tokens that read the slow tokens (in any hybrid layer).
    token_ids: [B, T'] the fitted prompt and, after `generate`, the generated tokens (T' = T + 1 there: the last
        generated token is returned by `generate` but never run through the model).
    prompt_length: tokens of the fitted prompt (with left padding, the same for every row).
    last_prompt_token: [B] the position of each row's last real prompt token (`forward` with right padding).
    num_frames: [B] frames (or temporal groups, see `unit`) of each row's videos, in order; F = max.
    timestamps: float64 [B, F], each frame's time in seconds when `looking(timestamps=...)` was given, else its
        index; NaN past a row's frames.
    unit: "frame", or "temporal group" (Qwen-VL encodes 2 frames per slice of slow tokens).
    sequences: what `generate` returned (None after `forward`).
    """

    layers: list[int]
    maps: torch.Tensor
    queried: torch.Tensor
    token_ids: torch.Tensor
    prompt_length: int
    last_prompt_token: torch.Tensor
    num_frames: torch.Tensor
    timestamps: torch.Tensor
    unit: str
    sequences: Any = None

    @property
    def num_new_tokens(self) -> int:
        return self.token_ids.shape[1] - self.prompt_length

    def answer_maps(self) -> torch.Tensor:
        """[num_layers, B, max(1, new tokens), F]: for each generated token, the map of the step that produced it;
        after `forward`, the map of each row's last prompt token (which predicts the next token)."""
        if self.num_new_tokens == 0:
            index = self.last_prompt_token[None, :, None, None].expand(len(self.layers), -1, 1, self.maps.shape[-1])
            return self.maps.gather(2, index)
        return self.maps[:, :, self.prompt_length - 1 : self.prompt_length - 1 + self.num_new_tokens]

    def per_frame(self, row: int = 0, *, tokens: str = "answer", layer: int | None = None) -> torch.Tensor:
        """[num_frames[row]]: the map summed over `tokens` ("answer": see `answer_maps`; "prompt": the prompt's
        tokens; "all"), of hybrid layer `layer` (its index in the model) or the mean over the hybrid layers."""
        if tokens == "answer":
            maps = self.answer_maps()[:, row]
        elif tokens in ("prompt", "all"):
            maps = self.maps[:, row, : self.prompt_length] if tokens == "prompt" else self.maps[:, row]
        else:
            raise ValueError(f"tokens must be 'answer', 'prompt' or 'all', got {tokens!r}.")
        if layer is not None:
            if layer not in self.layers:
                raise ValueError(f"Layer {layer} is not a hybrid layer; the hybrid layers are {self.layers}.")
            maps = maps[self.layers.index(layer)][None]
        return maps.sum(1).mean(0)[: int(self.num_frames[row])]

    def peak_frame(self, row: int = 0, *, tokens: str = "answer", layer: int | None = None) -> int:
        """The frame (index) with the most weight in `per_frame(row, tokens=..., layer=...)`."""
        return int(self.per_frame(row, tokens=tokens, layer=layer).argmax())


class CallRecorder:
    """Collects one call's per-frame maps; the hybrid layers call `attend` then `record` (`hybrid.py`)."""

    def __init__(
        self, slow: SlowTokens, layers: list[int], unit: str, timestamps: Sequence[Sequence[float]] | None
    ) -> None:
        self.frame_of_token, self.num_frames = frame_index(slow)  # moved to the keys' device at first use
        self.max_frames = int(self.num_frames.max())
        self.layers, self.unit = layers, unit
        self.timestamps = unit_timestamps(slow, timestamps)
        self.entries: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.prompt_ids = self.last_prompt_token = torch.empty(0, dtype=torch.long)  # set by `attach`
        self.new_tokens: torch.Tensor | None = None
        self.sequences: Any = None

    def attend(self, query: torch.Tensor, key: torch.Tensor, slow: SlowTokens, *, scaling: float) -> torch.Tensor:
        """query [B, H, Lq, hd] (RoPE'd, as the cross-attention uses it), key [B_k, H_kv, S, hd] ->
        [B, Lq, F] float32 attention mass per frame, mean over heads."""
        if self.frame_of_token.device != key.device:  # once per call, not per layer and step
            self.frame_of_token = self.frame_of_token.to(key.device)
        with torch.no_grad():
            mass = slow_attention_mass(
                query.detach(),
                key.detach(),
                slow.attend_mask.to(key.device),
                self.frame_of_token,
                self.max_frames,
                scaling=scaling,
            )
        return reduce(mass.float(), "b h l f -> b l f", "mean")

    def record(
        self, context: SlowContext, layer_idx: int, in_step: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """weights [B, Lq, F] (mass x |gate|) of the step's planned tokens at positions `in_step` [B, Lq] within the
        step, `valid` [B, Lq]. Keyed by the step's start as a value (a static cache keeps its length in a tensor it
        advances in place) and the layer: a recompute (activation checkpointing) overwrites."""
        start = int(context.step_start)
        positions = in_step.cpu() + start
        self.entries[(start, layer_idx)] = (positions, valid.cpu(), weights.detach().float().cpu())

    def finish(self, new_tokens: torch.Tensor, sequences: Any) -> None:
        """After `generate`: the generated tokens [B', N] and what `generate` returned."""
        self.new_tokens, self.sequences = new_tokens.detach().cpu(), sequences

    def result(self) -> FrameAttention:
        prompt_ids = self.prompt_ids
        batch = max([prompt_ids.shape[0]] + [positions.shape[0] for positions, _, _ in self.entries.values()])
        repeats = batch // self.num_frames.shape[0]  # num_return_sequences: rows b*n .. b*n+n-1 share a video
        expand = (lambda t: t.repeat_interleave(repeats, 0)) if repeats > 1 else (lambda t: t)
        prompt_ids = expand(prompt_ids)
        token_ids = prompt_ids if self.new_tokens is None else torch.cat([prompt_ids, self.new_tokens], -1)
        length = max([self.prompt_ids.shape[1]] + [int(p.max()) + 1 for p, _, _ in self.entries.values() if p.numel()])
        maps = torch.zeros(len(self.layers), batch, length, self.max_frames)
        queried = torch.zeros(batch, length, dtype=torch.bool)
        for (_, layer_idx), (positions, valid, weights) in sorted(self.entries.items()):
            rows = torch.arange(positions.shape[0])[:, None].expand_as(positions)[valid]
            maps[self.layers.index(layer_idx), rows, positions[valid]] = weights[valid]
            queried[rows, positions[valid]] = True
        return FrameAttention(
            layers=list(self.layers),
            maps=maps,
            queried=queried,
            token_ids=token_ids,
            prompt_length=self.prompt_ids.shape[1],
            last_prompt_token=expand(self.last_prompt_token),
            num_frames=expand(self.num_frames),
            timestamps=expand(self.timestamps),
            unit=self.unit,
            sequences=self.sequences,
        )


def _video_frames(slow: SlowTokens) -> tuple[list[tuple[SlowItem, int]], torch.Tensor]:
    """Each video's item with the index of its first frame within its row (a row's videos' frames counted in
    order; images have no frames), and num_frames [B] long."""
    num_frames = torch.zeros(slow.mask.shape[0], dtype=torch.long)
    videos = []
    for item in slow.items:
        if item.units:
            videos.append((item, int(num_frames[item.row])))
            num_frames[item.row] += item.units
    return videos, num_frames


def frame_index(slow: SlowTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame_of_token [B, S] long: each slow token's frame within its row, counting the row's videos' frames in
    order, -1 for images' tokens and padding; num_frames [B] long)."""
    videos, num_frames = _video_frames(slow)
    frame_of_token = torch.full(slow.mask.shape, -1, dtype=torch.long)
    for item, first in videos:
        if item.length % item.units:
            raise ValueError(f"A video of {item.units} frames has {item.length} slow tokens, not a multiple.")
        frames = torch.arange(first, first + item.units).repeat_interleave(item.length // item.units)
        frame_of_token[item.row, item.start : item.start + item.length] = frames
    return frame_of_token, num_frames


def unit_timestamps(slow: SlowTokens, timestamps: Sequence[Sequence[float]] | None) -> torch.Tensor:
    """float64 [B, F]: each frame's time (the first frame's time for a temporal group), NaN past a row's frames.

    timestamps: per video, in the order the processor got the videos (row-major), the time in seconds of each
    frame given to the processor, e.g. `VideoClip.timestamps`; None: frame (or group) indices."""
    videos, num_frames = _video_frames(slow)
    times = torch.full((num_frames.shape[0], max(1, int(num_frames.max()))), float("nan"), dtype=torch.float64)
    if timestamps is not None and len(timestamps) != len(videos):
        raise ValueError(f"timestamps has {len(timestamps)} entries but the inputs hold {len(videos)} videos.")
    for i, (item, first) in enumerate(videos):
        if timestamps is None:
            values = torch.arange(first, first + item.units, dtype=torch.float64)
        else:
            given = torch.as_tensor(timestamps[i], dtype=torch.float64)
            if given.numel() == 0 or given.numel() % item.units:
                raise ValueError(
                    f"Video {i} has {given.numel()} timestamps but {item.units} frames (or temporal groups): pass one "
                    "timestamp per frame given to the processor."
                )
            values = given[:: given.numel() // item.units]
        times[item.row, first : first + item.units] = values
    return times


@dataclass
class Recording:
    """What `looking` collects: one `CallRecorder` per slow-fast call of the model in the block."""

    owner: int
    layers: list[int]
    unit: str
    timestamps: Sequence[Sequence[float]] | None = None
    calls: list[CallRecorder] = field(default_factory=list)

    def result(self, call: int = -1) -> FrameAttention:
        """The maps of one call (the last by default)."""
        if not self.calls:
            raise RuntimeError(
                "No slow-fast call ran inside `looking(...)`: the inputs held no video, the model ran in the base or "
                "fast-only mode, or it was called outside the block."
            )
        return self.calls[call].result()


_LOOKING: ContextVar[Recording | None] = ContextVar("slowfast_looking", default=None)


@contextmanager
def looking(model: nn.Module, *, timestamps: Sequence[Sequence[float]] | None = None) -> Iterator[Recording]:
    """Record the per-frame maps of every slow-fast `forward`/`generate` call of `model` inside the block (this
    thread only). timestamps: per video, each frame's time in seconds (see `unit_timestamps`)."""
    recording = Recording(id(model), list(model.hybrid_layer_indices), model.family.unit_name, timestamps)
    token = _LOOKING.set(recording)
    try:
        yield recording
    finally:
        _LOOKING.reset(token)


def attach(model: nn.Module, context: SlowContext | None, prompt_ids: torch.Tensor, attention_mask) -> None:
    """Give `context` a `CallRecorder` when `model` runs inside `looking(model)` (called by forward/generate)."""
    recording = _LOOKING.get()
    if context is None or recording is None or recording.owner != id(model):
        return
    recorder = CallRecorder(context.slow, recording.layers, recording.unit, recording.timestamps)
    recorder.prompt_ids = prompt_ids.detach().cpu()
    if attention_mask is None:
        recorder.last_prompt_token = torch.full((prompt_ids.shape[0],), prompt_ids.shape[1] - 1)
    else:
        positions = torch.arange(prompt_ids.shape[1])
        recorder.last_prompt_token = (attention_mask.cpu().bool() * positions).amax(-1)
    context.frame_attention = recorder
    recording.calls.append(recorder)


def where_it_looked(
    model: nn.Module,
    inputs: dict[str, Any],
    *,
    max_new_tokens: int | None = None,
    timestamps: Sequence[Sequence[float]] | None = None,
    **generate_kwargs: Any,
) -> FrameAttention:
    """Run `model` on `inputs` (the stock processor's output; `encoded=` and other keywords pass through) and
    return where it looked: `generate` with `max_new_tokens`, else one `forward` under `torch.no_grad`.

    Beam search reorders its rows between steps, so maps would not follow a hypothesis: use greedy decoding or
    sampling (`num_beams=1`)."""
    if generate_kwargs.get("num_beams", 1) != 1:
        raise ValueError("where_it_looked follows each row step by step; beam search reorders rows. Use num_beams=1.")
    with looking(model, timestamps=timestamps) as recording, torch.no_grad():
        if max_new_tokens is None:
            model(**inputs, **generate_kwargs)
        else:
            model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
    return recording.result()
