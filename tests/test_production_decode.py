"""What runs on a GPU: the static cache (chunked prefill included) gives the dynamic cache's numbers, a decode step
adds no host sync to the base's, and transformers' compiled static-cache decode step is one graph with no break and
no recompilation, with eager's tokens. Every family; the slow path is made to matter first (gates opened, K/V
projection perturbed), so a step that misplaced it would change the scores."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import transformers
from conftest import make_inputs
from test_generation import SAMPLES, perturb_branches
from torch._dynamo.utils import counters
from transformers import CompileConfig

import slowfast_adapter as sfa
from slowfast_adapter.core import inspection
from slowfast_adapter.core.host_syncs import syncs_per_decode_step

GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


def _wrapped(base) -> sfa.SlowFastModel:
    model = sfa.wrap(base, sfa.SlowFastConfig(min_fast_frames=2, hybrid_layer_interval=2))
    perturb_branches(model)
    return model


def _assert_same_logits(a, b) -> None:
    # fp32 CPU: one step's logits differ by float rounding only (measured <= 1.1e-6 over the four families)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def _skip_unless_the_base_chunks_right(model, inputs) -> None:
    """transformers 5.18's own chunked prefill with video fails (Qwen) or gives other logits than one prefill
    (LLaVA-OneVision), for the bare base too, dynamic cache included: nothing the adapter can match there."""
    kwargs = dict(max_new_tokens=2, min_new_tokens=2, **GREEDY)
    with model.disable_adapter():
        try:
            whole, chunked = (model.generate(**inputs, **extra, **kwargs) for extra in ({}, {"prefill_chunk_size": 16}))
            pairs = zip(whole.logits, chunked.logits, strict=True)
            same = all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in pairs)
        except RuntimeError:
            same = False
    if not same:
        version = transformers.__version__
        pytest.skip(f"transformers {version}: the base model's own chunked prefill with video fails or differs")


@pytest.mark.parametrize("prefill_chunk_size", [None, 16])
@torch.no_grad()
def test_static_cache_equals_dynamic_cache(base, processor, prefill_chunk_size):
    """The static cache keeps its length in a tensor it advances inside its first layer: the hybrid layers after it
    must still see the step's start (the old code saw it shifted by the chunk's length under chunked prefill)."""
    model = _wrapped(base)
    inputs = make_inputs(processor, SAMPLES)  # two rows, left-padded
    chunking = {} if prefill_chunk_size is None else {"prefill_chunk_size": prefill_chunk_size}
    if chunking:
        _skip_unless_the_base_chunks_right(model, inputs)
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, **GREEDY)
    dynamic = model.generate(**inputs, **kwargs)
    static = model.generate(**inputs, cache_implementation="static", **chunking, **kwargs)
    _assert_same_logits(static, dynamic)
    with model.slow_path_disabled():  # the slow path matters: without it the scores move
        fast_only = model.generate(**inputs, cache_implementation="static", **chunking, **kwargs)
    assert max(float((a - b).abs().max()) for a, b in zip(fast_only.logits, static.logits, strict=True)) > 1e-3


@torch.no_grad()
def test_where_it_looked_under_the_static_cache_equals_the_dynamic_cache(base, processor):
    model = _wrapped(base)
    inputs = make_inputs(processor, SAMPLES[:1])
    _skip_unless_the_base_chunks_right(model, inputs)
    dynamic = sfa.where_it_looked(model, inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    static = sfa.where_it_looked(
        model, inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, cache_implementation="static",
        prefill_chunk_size=16,
    )  # fmt: skip
    assert torch.equal(static.queried, dynamic.queried)
    torch.testing.assert_close(static.maps, dynamic.maps, rtol=0, atol=1e-6)
    assert (static.answer_maps().sum(-1) > 0).all(), "every answer token's map is recorded (none overwritten)"


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@torch.no_grad()
def test_decode_adds_no_host_sync(base, processor, cache_implementation):
    inputs = make_inputs(processor, SAMPLES)  # padded batch
    cache = {"cache_implementation": cache_implementation}
    base_syncs = syncs_per_decode_step(base, inputs, **cache)
    model = _wrapped(base)
    wrapped_syncs = syncs_per_decode_step(model, inputs, **cache)
    assert base_syncs >= 1  # the stopping check: the counter does see syncs
    assert wrapped_syncs == base_syncs


@torch.no_grad()
def test_compiled_static_cache_decode_is_one_graph_without_recompiles(base, processor):
    """transformers' own compiled decode step (on the CPU only when asked: `_compile_all_devices`), fullgraph, over
    16 tokens and a second call about other videos: one graph, no break (fullgraph raises on one), no recompile."""
    model = _wrapped(base)
    compile_config = CompileConfig(backend="eager", fullgraph=True, dynamic=False)  # Dynamo only: seconds, not minutes
    compile_config._compile_all_devices = True
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, cache_implementation="static", **GREEDY)
    torch._dynamo.reset()
    counters.clear()
    for seed in (0, 7):
        inputs = make_inputs(processor, SAMPLES, seed=seed)
        compiled = model.generate(**inputs, compile_config=compile_config, **kwargs)
        _assert_same_logits(compiled, model.generate(**inputs, **kwargs))
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"] and not counters["graph_break"]
    torch._dynamo.reset()


@torch.no_grad()
def test_the_call_says_which_cross_attention_kernel_ran(base, processor):
    """sdpa bases run SDPA, eager bases the chunked eager kernel, and the call records it (a flash-attention base
    cannot run its own attention on the CPU; its fallback to SDPA is `test_attention.py`'s kernel test)."""
    model = _wrapped(base)
    inputs = make_inputs(processor, SAMPLES[:1])
    for implementation, kernel in (("sdpa", "sdpa"), ("eager", "eager")):
        for layer in model.family.decoder_layers(base):  # what `set_attn_implementation` changes, without its checks
            layer.self_attn.config._attn_implementation = implementation
        with inspection.recording() as contexts:
            model(**inputs)
        assert contexts[0].counters.kernels == {kernel}, implementation
    for layer in model.family.decoder_layers(base):
        layer.self_attn.config._attn_implementation = "sdpa"


@torch.no_grad()
def test_slow_kv_are_held_in_sdpa_layout(base, processor):
    """Each hybrid layer's slow K/V are two contiguous [B, H_kv, S, hd] tensors: the layout SDPA reads fastest and
    the one a compiled (inductor) step reads in place. As views of one [B, S, 2 * H_kv * hd] projection, inductor
    copied both into this layout at every decode step (measured: the compiled slow-fast step / base 1.15 -> 1.11)."""
    model = _wrapped(base)
    with inspection.recording() as contexts:
        model(**make_inputs(processor, SAMPLES))
    text = base.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    slow_tokens = contexts[0].slow.tokens.shape[1]
    for key, value in contexts[0].slow_kv.values():
        for tensor in (key, value):
            assert tensor.is_contiguous()
            assert tensor.shape == (len(SAMPLES), text.num_key_value_heads, slow_tokens, head_dim)
