"""The hybrid hooks reach the adapter's parameters only inside module calls, as parameter sharding needs.

Under DeepSpeed ZeRO-3 a parameter holds its data only between its own module's forward pre-hook and post-hook;
elsewhere it is an empty partition. This emulates exactly that on one process, for every adapter module, and
checks that `forward` and `generate` still give the same results. The real engines run in tests/test_training.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from conftest import make_inputs, open_gates
from torch import nn

import slowfast_adapter as sfa

SAMPLES = [("video", "What happens?"), ("video", "Describe it.")]


@contextlib.contextmanager
def empty_outside_module_calls(root: nn.Module) -> Iterator[None]:
    """Every parameter directly owned by a module under `root` is empty except while that module runs."""
    whole = {p: p.data for p in root.parameters()}
    empty = {p: torch.empty(0, dtype=p.dtype) for p in whole}

    def fill(module: nn.Module, *args) -> None:
        for p in module.parameters(recurse=False):
            p.data = whole[p]

    def clear(module: nn.Module, *args) -> None:
        for p in module.parameters(recurse=False):
            p.data = empty[p]

    handles = []
    for module in root.modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles += [module.register_forward_pre_hook(fill), module.register_forward_hook(clear)]
            clear(module)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for p, data in whole.items():
            p.data = data


@torch.no_grad()
def test_adapter_parameters_are_read_only_inside_their_module_calls(base, processor):
    model = sfa.wrap(base, sfa.SlowFastConfig(min_fast_frames=2, hybrid_layers=[0, 1]))
    open_gates(model)
    inputs = make_inputs(processor, SAMPLES)
    expected = model(**inputs).logits
    expected_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with model.slow_path_disabled():
        assert not torch.equal(expected, model(**inputs).logits)  # the slow path is in play
    with empty_outside_module_calls(model.slowfast_adapters):
        assert all(p.numel() == 0 for p in model.slowfast_adapters.parameters())
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), expected_tokens)
