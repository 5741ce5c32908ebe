"""Inspecting slow-fast calls (tests, benchmarks, the demo): what the slow path did, and a debug mode.

`recording()` collects the `SlowContext` of every call made in the block; `context.counters` (a `CallCounters`)
says what that call did. Counters move in eager mode only: a compiled decode step keeps no Python-side record, which
would change what `torch.compile` guards on per token. `reprojecting_slow_kv(model)` makes a model re-project the
slow K/V at every step, as the reference implementation does (same outputs, more compute).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CallCounters:
    """What one call's slow path did (eager mode only).

    steps: language-model forwards; slow_reads: hybrid-layer calls in which at least one token read the slow
    tokens; kv_projections: slow K/V projections (not counted for a layer whose K/V all came from `encoded`);
    reads: one entry per such hybrid-layer call, (step number from 1, layer index, [B] count per row of the tokens
    that read the slow tokens); kernels: the cross-attention kernels that ran ("eager", "sdpa", "flash_attn").
    """

    steps: int = 0
    slow_reads: int = 0
    kv_projections: int = 0
    reads: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)
    kernels: set[str] = field(default_factory=set)

    def step(self) -> None:
        if not torch.compiler.is_compiling():
            self.steps += 1

    def read(self, layer_idx: int, per_row: torch.Tensor) -> None:
        if not torch.compiler.is_compiling():
            self.reads.append((self.steps, layer_idx, per_row))
            self.slow_reads += 1

    def kernel(self, kernel: str) -> None:
        if not torch.compiler.is_compiling():
            self.kernels.add(kernel)

    def kv_projection(self) -> None:
        if not torch.compiler.is_compiling():
            self.kv_projections += 1

    def totals(self) -> dict[str, int]:
        """{"steps", "slow_reads", "kv_projections"}: the counts, as a dict (benchmarks' JSON)."""
        return {"steps": self.steps, "slow_reads": self.slow_reads, "kv_projections": self.kv_projections}


_RECORDER: ContextVar[list[Any] | None] = ContextVar("slowfast_recorder", default=None)
_REPROJECTING: ContextVar[frozenset[int]] = ContextVar("slowfast_reprojecting", default=frozenset())


@contextmanager
def recording() -> Iterator[list[Any]]:
    """Collect every `SlowContext` created in this thread within the block (read `context.counters`)."""
    contexts: list[Any] = []
    token = _RECORDER.set(contexts)
    try:
        yield contexts
    finally:
        _RECORDER.reset(token)


def record(context: Any) -> None:
    """Called by each new `SlowContext`: kept when a `recording()` block is open."""
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.append(context)


@contextmanager
def reprojecting_slow_kv(model: torch.nn.Module) -> Iterator[None]:
    """Within the block (this thread), calls of `model` (a `SlowFastModel`) re-project the slow K/V at every step
    instead of once per call: the reference's decode behaviour, to measure what the cache saves."""
    token = _REPROJECTING.set(_REPROJECTING.get() | {id(model)})
    try:
        yield
    finally:
        _REPROJECTING.reset(token)


def reprojects(model: torch.nn.Module) -> bool:
    """Whether `model` runs inside `reprojecting_slow_kv(model)`."""
    return id(model) in _REPROJECTING.get()
