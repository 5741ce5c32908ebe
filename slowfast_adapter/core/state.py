"""Per-call state: the slow tokens of one `forward`/`generate` call, scoped with `contextvars`.

Nothing is stored on modules. A call activates a `SlowContext`; the hybrid-layer hooks read it through
a context variable, which is private to the running thread (and asyncio task), and check that it
belongs to their own model. Two models, or two threads using one model, never see each other's video.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from . import inspection
from .inspection import CallCounters
from .surface import changed
from .types import SlowKVCache, SlowTokens


def prompt_query_mask(visual_mask: torch.Tensor, query_tokens: str) -> torch.Tensor:
    """[B, L] bool: the prompt tokens that query the slow tokens, by `SlowFastConfig.query_tokens`.

    visual_mask: [B, L] True on visual placeholder tokens. "text": every non-visual token;
    "text_after_first_video": non-visual tokens after a sample's first visual token; "all": every token.
    """
    if query_tokens == "text":
        return ~visual_mask
    if query_tokens == "text_after_first_video":
        return ~visual_mask & (visual_mask.long().cumsum(-1) > 0)
    if query_tokens == "all":
        return torch.ones_like(visual_mask)
    raise ValueError(f"Unknown query_tokens {query_tokens!r}.")


@dataclass
class SlowContext:
    """Everything the hybrid layers need during one call.

    prompt_query_mask: [B, L0] bool, which prompt tokens query the slow tokens. Tokens past the prompt
    (generated ones) always query them.
    slow_kv: layer index -> (key, value) [B, H_kv, S, hd], projected once per call and reused at every
    decode step.
    reproject_slow_kv: debug only: re-project the slow K/V at every forward step instead of caching them
    (the reference implementation's decode behaviour, for benchmarks); outputs are the same.
    step_start, step_length: where the language model's current forward starts in the sequence and how
    many tokens it runs; set once per step by `begin_step` (a hook on the language model), read by every
    hybrid layer. step_start is an int, or a 0-d tensor under a static cache (its length lives on the device).
    step_plan: which of the step's tokens query, worked out by the step's first hybrid layer and reused by the
    others (`hybrid.StepPlan`). Positions come from the step's KV cache, so greedy, sampling, beam search, chunked
    prefill, cropped (assisted) caches and `use_cache=False` all get the right query mask.
    counters: what the call did (`inspection.CallCounters`, eager mode only); `inspection.recording()` collects
    the contexts of a block.
    encoded: videos encoded earlier (`SlowFastModel.encode`) whose slow K/V this call may reuse; with
    `store_kv`, K/V it projects for them are kept there (what `encode` does).
    frame_attention: set only inside `frame_attention.looking(...)`: the hybrid layers also record how much
    attention they put on each frame (a `frame_attention.CallRecorder`); None (the default) costs nothing.
    """

    owner: int
    slow: SlowTokens
    prompt_query_mask: torch.Tensor
    slow_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    reproject_slow_kv: bool = False
    pending: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    step_start: int | torch.Tensor | None = None
    step_length: int | None = None
    step_plan: Any = None
    counters: CallCounters = field(default_factory=CallCounters)
    encoded: SlowKVCache | None = None
    store_kv: bool = False
    frame_attention: Any = None

    def __post_init__(self) -> None:
        inspection.record(self)

    def begin_step(self, length: int, cached: int | torch.Tensor | None) -> None:
        """A language-model forward over `length` tokens, after `cached` tokens in its KV cache (None: no cache).

        `cached` is read as a value: a static cache reports its length as a tensor it advances in place inside its
        first layer, so a reference to it would shift the start seen by every later layer (a copy is kept)."""
        if cached is None and self.counters.steps > 0 and length < self.prompt_query_mask.shape[1]:
            raise changed(
                "language_model(cache=...)",
                f"a decode step of {length} token(s) reached the language model without a transformers.Cache, so "
                "its position in the sequence is unknown and the slow path cannot run correctly.",
            )
        if cached is None:
            cached = 0
        self.step_start = cached.clone() if isinstance(cached, torch.Tensor) else int(cached)
        self.step_length = length
        self.step_plan = None
        self.counters.step()  # eager only: a compiled step keeps no count

    def step_query_mask(self, length: int, batch: int) -> torch.Tensor:
        """[batch, length] bool for the current step; checks the step was announced by `begin_step`."""
        if self.step_length != length:
            raise changed(
                "language_model.forward",
                f"a hybrid layer saw {length} tokens but the language model's step hook announced "
                f"{self.step_length}: the decoder layers were called without the language model's forward.",
            )
        return self.query_mask(self.step_start, length, batch)

    def query_mask(self, past_length: int | torch.Tensor, length: int, batch: int) -> torch.Tensor:
        """[batch, length] bool for the tokens at positions past_length .. past_length + length - 1 (an int, or a
        0-d tensor as a static cache reports it). Arithmetic only: no host sync, shapes fixed by `length`."""
        prompt = self.prompt_query_mask
        if batch != prompt.shape[0]:
            prompt = prompt.repeat_interleave(batch // prompt.shape[0], dim=0)
        if prompt.shape[1] == 0:
            return torch.ones(batch, length, dtype=torch.bool, device=prompt.device)
        if isinstance(past_length, torch.Tensor):
            past_length = past_length.to(prompt.device)
        positions = torch.arange(length, device=prompt.device) + past_length  # [L]
        inside = positions < prompt.shape[1]  # generated tokens (past the prompt) always query
        index = positions.clamp(max=prompt.shape[1] - 1).expand(batch, length)
        return prompt.gather(1, index) | ~inside


_ACTIVE: ContextVar[SlowContext | None] = ContextVar("slowfast_active_context", default=None)
_MODES: ContextVar[dict[int, str]] = ContextVar("slowfast_modes", default={})  # noqa: B039 (never mutated)


@contextmanager
def activated(context: SlowContext | None) -> Iterator[None]:
    """Make `context` the active slow context for the duration of the block (None = no slow path)."""
    token = _ACTIVE.set(context)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_context(owner: int) -> SlowContext | None:
    context = _ACTIVE.get()
    return context if context is not None and context.owner == owner else None


@contextmanager
def mode(owner: int, name: str) -> Iterator[None]:
    """Run a model (identified by `owner`) in mode `name` within the block, for this thread only."""
    token = _MODES.set({**_MODES.get(), owner: name})
    try:
        yield
    finally:
        _MODES.reset(token)


def current_mode(owner: int) -> str:
    return _MODES.get().get(owner, "slowfast")


def current_context() -> SlowContext | None:
    """The active slow context of this thread, whoever owns it."""
    return _ACTIVE.get()


def checkpoint_context_fn() -> tuple[AbstractContextManager, AbstractContextManager]:
    """`context_fn` for `torch.utils.checkpoint`: the recompute in backward runs in the forward's slow context,
    at the forward's step (a shallow copy: the slow K/V cache, pending updates and counters stay shared)."""
    context = _ACTIVE.get()
    return nullcontext(), activated(None if context is None else copy.copy(context))
