"""The debug flag that reproduces the reference's decode behaviour (slow K/V re-projected at every step)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, open_gates
from transformers import AutoModelForImageTextToText, AutoProcessor

import slowfast_adapter as sfa
from slowfast_adapter.core import inspection

CONFIG = sfa.SlowFastConfig(min_fast_frames=2, hybrid_layer_interval=2)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
@torch.no_grad()
def test_reprojecting_every_step_runs_kv_proj_per_step_and_changes_nothing(tiny_dirs, family):
    base = AutoModelForImageTextToText.from_pretrained(tiny_dirs(family)).eval()
    processor = AutoProcessor.from_pretrained(tiny_dirs(family))
    model = sfa.wrap(base, CONFIG)
    open_gates(model)
    inputs = make_inputs(processor, [("video", "What color is the star?"), ("Tell me", "video", "red or blue?")])
    new_tokens, layers = 5, len(model.slow_branches)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    def run() -> tuple[torch.Tensor, list]:
        calls = []
        handles = [b.kv_proj.register_forward_hook(lambda m, a, o: calls.append(a[0].shape)) for b in
                   model.slow_branches.values()]  # fmt: skip
        out = model.generate(**kwargs, **inputs, output_scores=True, return_dict_in_generate=True)
        for handle in handles:
            handle.remove()
        return out, calls

    cached, cached_calls = run()
    with inspection.reprojecting_slow_kv(model):
        reprojected, reprojected_calls = run()
    assert len(cached_calls) == layers  # once per prompt per hybrid layer
    assert len(reprojected_calls) == new_tokens * layers  # the prefill and each of the 4 decode steps
    assert torch.equal(reprojected.sequences, cached.sequences)
    for a, b in zip(reprojected.scores, cached.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with model.slow_path_disabled():
        fast_only, _ = run()
    # The equality above means something: every decode step's scores depend on the slow tokens.
    for step in range(1, new_tokens):
        finite = cached.scores[step].isfinite()  # min_new_tokens masks EOS with -inf in both
        assert (fast_only.scores[step] - cached.scores[step])[finite].abs().max() > 1e-3, step
