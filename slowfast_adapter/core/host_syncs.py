"""Count the device-to-host syncs a piece of torch code makes (each one drains a GPU's launch queue).

    with HostSyncCounter() as syncs:
        model.generate(**inputs, max_new_tokens=8)
    syncs.count, syncs.sites()   # how many, and where (file:line function -> count)

A `TorchFunctionMode` sees every call that turns a tensor's value into Python: `Tensor.item`, `tolist`,
`__bool__`, `__int__`, `__float__`, `__index__`, `nonzero` (its output size depends on the data), and indexing
or index-assignment with a boolean mask. It runs on the CPU too, where there is no real sync: the calls are the
same ones that would sync on a GPU. Code inside `torch.compile`d regions is not seen.
"""

from __future__ import annotations

import traceback
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

VALUE_READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"})
"""Tensor methods whose result is a Python value (or a data-dependent shape)."""


def _boolean_index(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)


class HostSyncCounter(TorchFunctionMode):
    """Counts host syncs (see the module docstring) made inside the block, with the caller of each."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._sites: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        indexing = name in ("__getitem__", "__setitem__") and len(args) > 1
        if name in VALUE_READS or (indexing and _boolean_index(args[1])):
            self.count += 1
            caller = traceback.extract_stack(limit=2)[0]  # the frame that called the tensor method
            self._sites[f"{caller.filename}:{caller.lineno} {caller.name}"] += 1
        return func(*args, **(kwargs or {}))

    def sites(self) -> dict[str, int]:
        """Where the syncs happened: 'file:line function' -> count, most frequent first."""
        return dict(self._sites.most_common())


def syncs_per_decode_step(model: Any, inputs: dict[str, Any], *, tokens: int = 6, **generate_kwargs: Any) -> float:
    """Host syncs per decode step of greedy `model.generate(**inputs)`: (syncs of `tokens` new tokens - syncs of 2) /
    (tokens - 2), so the prefill's cancel out. Under `torch.compile` the counter's mode recompiles the step."""
    counts = []
    for new_tokens in (2, tokens):
        with HostSyncCounter() as syncs:
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           **generate_kwargs)  # fmt: skip
        counts.append(syncs.count)
    return (counts[1] - counts[0]) / (tokens - 2)
