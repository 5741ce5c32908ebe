"""The fence (`slowfast_adapter/core/surface.py`): every internal we touch exists on the installed releases, and a
missing or renamed one fails loudly, naming itself and the installed versions."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch
from conftest import make_inputs
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import slowfast_adapter as sfa
from slowfast_adapter.core import inspection, state, surface

CONFIG = sfa.SlowFastConfig(min_fast_frames=2, hybrid_layer_interval=2)
TRANSFORMERS = Version(importlib.metadata.version("transformers"))
# The keyword arguments transformers passes to a decoder layer's `self_attn` and to the language model, as
# observed on the tested releases. A new release that changes them fails here before anything runs silently
# without the slow path; update this table (and the fence, if a name we read changed) after reading the diff.
_CACHE = "cache" if TRANSFORMERS >= Version("5.24.0") else "past_key_values"
_ATTENTION = {"attention_mask", _CACHE, "hidden_states", "position_embeddings", "position_ids", "use_cache"}
ATTENTION_KWARGS = {
    "llava_onevision": _ATTENTION | {"logits_to_keep"},
    "qwen2_vl": _ATTENTION,
    "qwen2_5_vl": _ATTENTION,
    "qwen3_vl": _ATTENTION,
}
LANGUAGE_MODEL_KWARGS = {
    "llava_onevision": {"attention_mask", _CACHE, "inputs_embeds", "logits_to_keep", "position_ids", "use_cache"},
    "qwen2_vl": {"attention_mask", _CACHE, "input_ids", "inputs_embeds", "position_ids", "use_cache"},
    "qwen2_5_vl": {"attention_mask", _CACHE, "input_ids", "inputs_embeds", "position_ids", "use_cache"},
    "qwen3_vl": {
        "attention_mask",
        _CACHE,
        "deepstack_visual_embeds",
        "input_ids",
        "inputs_embeds",
        "position_ids",
        "use_cache",
        "visual_pos_masks",
    },  # fmt: skip
}


def test_the_declared_range_is_the_tested_range():
    """pyproject.toml declares exactly the range the fence names (and CI tests both of its ends)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = [Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("transformers")]
    assert [r.specifier for r in declared] == [SpecifierSet(surface.TESTED_TRANSFORMERS)]
    assert TRANSFORMERS in declared[0].specifier, f"the installed transformers {TRANSFORMERS} is outside the range"


def test_check_model_accepts_every_family(base):
    surface.check_model(base)
    assert len(surface.decoder_layers(base)) == base.config.get_text_config().num_hidden_layers


@pytest.mark.parametrize(
    "where, name",
    [
        ("model.model", "language_model"),
        ("layer", "self_attn"),
        ("layer", "input_layernorm"),
        *[("attn", name) for name in surface.ATTENTION_MODULE_ATTRIBUTES],
    ],
)
def test_a_missing_internal_is_named_with_the_installed_versions(base, where, name):
    layer = base.model.language_model.layers[-1]
    owner = {"model.model": base.model, "layer": layer, "attn": layer.self_attn}[where]
    if name in owner._modules:
        delattr(owner, name)
    else:  # plain attributes (head_dim, scaling, ...) live in the instance's __dict__
        del owner.__dict__[name]
    assert not hasattr(owner, name)
    with pytest.raises(surface.SurfaceError, match=rf"`[^`]*{name}`.*transformers {TRANSFORMERS}"):
        surface.check_model(base)
    with pytest.raises(surface.SurfaceError, match=name):
        sfa.wrap(base, CONFIG)


def test_missing_vision_entry_points_and_encoder_outputs_are_named(base, monkeypatch):
    monkeypatch.delattr(type(base.model), "get_video_features")
    with pytest.raises(surface.SurfaceError, match="get_video_features"):
        surface.check_model(base)


def test_a_forward_that_would_swallow_encoder_outputs_in_kwargs_is_refused(base, monkeypatch):
    """transformers < 5.18: `forward(..., **kwargs)` without `mm_encoder_outputs` ignores the fast tokens."""
    monkeypatch.setattr(type(base), "forward", lambda self, input_ids=None, **kwargs: None)
    with pytest.raises(surface.SurfaceError, match="mm_encoder_outputs"):
        sfa.wrap(base, CONFIG)


@torch.no_grad()
def test_hooks_receive_exactly_the_known_keyword_arguments_in_prefill_and_decode(base, processor, family):
    model = sfa.wrap(base, CONFIG)
    layer = base.model.language_model.layers[model.hybrid_layer_indices[0]]
    seen, steps = [], []  # steps: (length, cached) read when the hook ran (the cache object grows later)

    def on_language_model(module, args, kwargs):
        seen.append(("language_model", args, dict(kwargs)))
        steps.append(surface.language_model_step(args, kwargs))

    def on_attention(module, args, kwargs):
        seen.append(("self_attn", args, dict(kwargs)))

    handles = [
        base.model.language_model.register_forward_pre_hook(on_language_model, with_kwargs=True),
        layer.self_attn.register_forward_pre_hook(on_attention, with_kwargs=True),
    ]
    inputs = make_inputs(processor, [("video", "What is it?")])
    with inspection.recording() as contexts:
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    for handle in handles:
        handle.remove()
    assert [where for where, _, _ in seen] == ["language_model", "self_attn"] * 3  # prefill, 2 decode steps
    prompt_length = model.prepare_inputs(**inputs).input_ids.shape[1]
    for step, (where, args, kwargs) in enumerate(seen):
        length = prompt_length if step < 2 else 1
        assert args == ()
        if where == "self_attn":
            assert set(kwargs) == ATTENTION_KWARGS[family]
            assert surface.attention_hidden_states(args, kwargs).shape[:2] == (1, length)
            cos, sin = surface.attention_rope(kwargs)
            assert cos.shape[-2:] == sin.shape[-2:] == (length, layer.self_attn.head_dim)
        else:
            assert set(kwargs) == LANGUAGE_MODEL_KWARGS[family]
    # The step position comes from the cache, found by type: empty, then the prompt, then the prompt + 1 token.
    assert steps == [(prompt_length, 0), (1, prompt_length), (1, prompt_length + 1)]
    assert contexts[0].counters.steps == 3


@torch.no_grad()
def test_a_decode_step_without_a_cache_or_without_the_step_hook_raises(base, processor):
    model = sfa.wrap(base, CONFIG)
    context = model.slow_context(model.prepare_inputs(**make_inputs(processor, [("video", "What is it?")])))
    hidden = base.config.get_text_config().hidden_size
    with state.activated(context):
        base.model.language_model(inputs_embeds=torch.zeros(1, context.prompt_query_mask.shape[1], hidden))
        with pytest.raises(surface.SurfaceError, match="without a transformers.Cache.*transformers"):
            base.model.language_model(inputs_embeds=torch.zeros(1, 1, hidden))
    context = model.slow_context(model.prepare_inputs(**make_inputs(processor, [("video", "What is it?")])))
    layer = base.model.language_model.layers[model.hybrid_layer_indices[0]]
    rotary = base.model.language_model.rotary_emb
    embeds = torch.zeros(1, 3, hidden)
    positions = torch.arange(3)[None]
    if family_uses_mrope(base):
        positions = positions.expand(3, 1, 3)
    with state.activated(context), pytest.raises(surface.SurfaceError, match="step hook"):
        layer(embeds, position_embeddings=rotary(embeds, positions), attention_mask=None)


def family_uses_mrope(base) -> bool:
    return "Qwen" in type(base).__name__


def test_peft_and_torch_internals_exist():
    from peft.tuners.lora import LoraLayer

    for name in ("adapter_layer_names", "get_base_layer"):
        assert hasattr(LoraLayer, name), f"peft {importlib.metadata.version('peft')}: LoraLayer.{name} is gone"
    assert surface.cpu_sdpa_op() is not None
    assert issubclass(surface.TorchDispatchMode, object)


def test_tensor_version_counts_in_place_changes():
    """Cached slow K/V are trusted only while the parameters' version counters stand still."""
    param = torch.nn.Parameter(torch.zeros(3))
    before = surface.tensor_version(param)
    with torch.no_grad():
        param.add_(1.0)
    assert surface.tensor_version(param) > before
