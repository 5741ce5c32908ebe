"""FLOP counting on the meta device equals counting the real model on real tensors, and the 7B numbers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_inputs
from transformers import AutoModelForImageTextToText, AutoProcessor

import slowfast_adapter as sfa
from slowfast_adapter.cli import main
from slowfast_adapter.core import inspection, surface
from slowfast_adapter.tools import flops

CONFIG = sfa.SlowFastConfig(min_fast_frames=2, hybrid_layer_interval=2)
FRAMES = 8  # LLaVA: 8 frames -> 2 fast frames; Qwen: 4 temporal groups -> 2 fast groups


def _real_flops(fn) -> int:
    return flops.count_flops(fn, custom_mapping=flops.CPU_SDPA_FLOPS)[0]


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_meta_report_equals_the_real_model_counted_on_real_tensors(tiny_dirs, family):
    """Vision, prefill (base and slow-fast) and decode steps (cached and re-projected) of a real call."""
    folder = tiny_dirs(family)
    base = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = make_inputs(processor, [("video", "What color is the star?")], frames=FRAMES)
    model = sfa.wrap(base, CONFIG)
    prepared = model.prepare_inputs(**inputs)
    native_length, fast_length = inputs["input_ids"].shape[1], prepared.input_ids.shape[1]

    image_size = None if family == "llava_onevision" else 32
    meta_base = flops.build_meta_model(base.config)
    native = flops.video_tokens(meta_base, FRAMES, None, image_size=image_size)
    fast = flops.video_tokens(meta_base, FRAMES, CONFIG, image_size=image_size)
    timestamps = 0
    if family == "qwen3_vl":  # the tiny tokenizer writes its own `<t seconds>` texts: take their length from the inputs
        timestamps = (native_length - fast_length - native.visual_tokens + fast.visual_tokens) // (
            native.units - fast.fast_units
        ) - 2
    text_tokens = native_length - native.visual_tokens - native.units * (timestamps + 2 if timestamps else 0)
    report = flops.flops_report(
        base.config, [FRAMES], base_frames=FRAMES, text_tokens=text_tokens, slowfast=CONFIG, image_size=image_size,
        qwen3_timestamp_tokens=timestamps,
    )  # fmt: skip
    base_column, column = report.columns
    assert (base_column.sequence_length, column.sequence_length) == (native_length, fast_length)

    with model.disable_adapter():
        assert _real_flops(lambda: model(**inputs, logits_to_keep=1)) == base_column.vision + base_column.llm_prefill
    assert _real_flops(lambda: model(**inputs, logits_to_keep=1)) == column.vision + column.llm_with_hybrid
    generate = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False)
    with torch.no_grad():
        two_tokens = _real_flops(lambda: model.generate(**inputs, **generate))
        with inspection.reprojecting_slow_kv(model):
            two_tokens_reprojecting = _real_flops(lambda: model.generate(**inputs, **generate))
    assert two_tokens == column.vision + column.llm_with_hybrid + column.decode_step
    assert two_tokens_reprojecting == column.vision + column.llm_with_hybrid + column.decode_step_reprojecting
    assert column.hybrid_kv_projection > 0 and column.hybrid_queries > 0


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_vision_count_per_group_extrapolation_is_exact(tiny_dirs, family):
    config = AutoModelForImageTextToText.from_pretrained(tiny_dirs(family)).config
    meta = flops.build_meta_model(config)
    tokens = flops.video_tokens(meta, 10, None, image_size=48)  # 5 temporal groups of 6 x 6 patches
    assert flops.count_vision(meta, tokens) == flops.count_vision(meta, tokens, direct=True)


@pytest.fixture(scope="module")
def llava_video_7b():
    return flops.load_config("llava-video-7b-qwen2")


def test_qwen2_7b_decoder_over_3236_tokens_is_49_96_tflop(llava_video_7b):
    """The known sanity value: Qwen2-7B over 3,236 tokens, logits for every token."""
    model = flops.build_meta_model(llava_video_7b)
    embeds = torch.empty(1, 3236, 3584, device="meta")

    def forward():
        cache = __import__("transformers").DynamicCache(config=llava_video_7b.text_config)
        hidden = surface.run_language_model(model, embeds, cache)
        return model.lm_head(hidden)

    assert round(flops.count_flops(forward)[0] / 1e12, 2) == 49.96


def test_paper_claim_on_llava_video_7b_128_slow_fast_frames_vs_16_base_frames(llava_video_7b):
    config = sfa.SlowFastConfig(temporal_sampling_stride=2)  # the released 128-frame setting: s2/t4, 16 fast frames
    report = flops.flops_report(llava_video_7b, [128], base_frames=16, slowfast=config, text_tokens=100)
    base, slowfast = report.columns
    assert base.sequence_length == slowfast.sequence_length == 16 * 196 + 1 + 100
    assert slowfast.slow_tokens == 128 * 196 and report.hybrid_layers == [0, 8, 16, 24]
    # Exact analytic counts of the hybrid branch: 4 layers of K/V projection over the slow tokens, and for
    # the 100 text queries: q_proj, attention over the slow tokens (QK^T and PV), the 1-output gate.
    hidden, kv_width, heads, head_dim, slow, queries = 3584, 4 * 128, 28, 128, 128 * 196, 100
    assert slowfast.hybrid_kv_projection == 4 * 2 * slow * hidden * 2 * kv_width
    per_layer = 2 * queries * hidden * hidden + 4 * queries * heads * slow * head_dim + 2 * queries * hidden
    assert slowfast.hybrid_queries == 4 * per_layer
    ratio = slowfast.llm_with_hybrid / base.llm_prefill
    assert 1.0 < ratio < 1.03  # the paper: about +3% LLM prefill for 8x the frames
    assert slowfast.vision == 8 * base.vision
    assert slowfast.decode_step_reprojecting > 40 * base.decode_step > 40 * (slowfast.decode_step / 1.2)
    # The decode step reads the slow tokens: a little more than the base (the new token's query, attention and gate).
    per_decode_token = 4 * (2 * hidden * hidden + 4 * heads * slow * head_dim + 2 * hidden)
    assert slowfast.decode_step - base.decode_step == per_decode_token


def _fields(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


def test_config_sources_folder_file_shipped_name_and_hub_id(tmp_path, monkeypatch, llava_video_7b):
    llava_video_7b.save_pretrained(tmp_path)
    from_folder = _fields(flops.load_config(str(tmp_path)))
    from_file = _fields(flops.load_config(str(tmp_path / "config.json")))
    assert from_folder == from_file == _fields(flops.load_config("llava-hf/LLaVA-Video-7B-Qwen2-hf"))

    calls = []

    def fake_download(repo_id, filename):
        calls.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    assert _fields(flops.load_config("someone/some-video-model")) == from_folder
    assert calls == [("someone/some-video-model", "config.json")]


def test_shipped_qwen2_vl_7b_config_has_the_real_shapes():
    config = flops.load_config("qwen2-vl-7b-instruct")
    text = config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        3584, 28, 28, 4,
    )  # fmt: skip
    assert (
        text.intermediate_size == 18944 and config.vision_config.depth == 32 and config.vision_config.embed_dim == 1280
    )


def test_cli_table_and_json(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "report.json"
    args = ["flops", str(tiny_dirs("qwen2_vl")), "--frames", "8", "--image-size", "32", "--min-fast-frames", "2"]
    assert main([*args, "--hybrid-layers", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "base @4f" in table and "slow-fast @8f" in table and "LLM prefill incl. hybrid" in table
    data = json.loads(out.read_text())
    assert data["hybrid_layers"] == [1] and [c["frames"] for c in data["columns"]] == [4, 8]
    assert data["llm_prefill_ratio_to_base"][0] == 1.0 and data["columns"][1]["slow_tokens"] == 4 * 16


def test_bad_video_geometry_is_refused(tiny_dirs):
    meta = flops.build_meta_model(AutoModelForImageTextToText.from_pretrained(tiny_dirs("qwen2_vl")).config)
    with pytest.raises(ValueError, match="multiple of 8 px"):
        flops.video_tokens(meta, 8, None, image_size=36)
    with pytest.raises(ValueError, match="multiple of 2"):
        flops.video_tokens(meta, 7, None, image_size=32)
