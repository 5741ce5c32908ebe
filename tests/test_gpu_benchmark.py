"""benchmarks/gpu.py runs end to end on the tiny model on the CPU and proves every path it times ran."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu.py"
SECTIONS = {
    "prefill": ["base", "slowfast", "base_llm", "slowfast_llm"],
    "decode": ["base", "slowfast_cached", "slowfast_reprojected", "base_compiled", "slowfast_compiled"],
    "train": ["slowfast_8"],
    "memory": ["slowfast_16", "slowfast_32", "base_16", "base_32"],
}


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_run_on_the_cpu_writes_every_number_and_proves_every_path(gpu, tmp_path):
    out = tmp_path / "gpu.json"
    argv = [
        "--tiny",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--repeats",
        "1",
        "--decode-steps",
        "2",
        "--train-steps",
        "1",
        "--compile-backend",
        "eager",  # Dynamo without inductor: the same graph and guards in seconds
    ]
    # Smaller than the --tiny defaults (base 4, slow-fast 32, train 16, memory 32 64 128) to stay fast on 2 cores.
    argv += ["--slowfast-frames", "16", "--train-frames", "8", "--frames", "16", "32", "--text-tokens", "40"]
    assert gpu.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["dtype"] == "float32" and data["attn_implementation"] == "sdpa"
    assert data["torch"] == torch.__version__ and data["transformers"] and data["ok"] is True
    assert data["errors"] == {} and data["skipped"] == {}
    for section, names in SECTIONS.items():
        assert sorted(data[section]) == sorted(names), section
        for name in names:
            entry = data[section][name]
            numbers = ["median_s"] if section in ("prefill", "decode") else ["peak_mib"]
            numbers += ["median_s"] if section == "train" else []
            for key in [*numbers, "llm_tokens", "slow_tokens", "frames"]:
                assert isinstance(entry[key], int | float), (section, name, key)
            assert (entry["slow_tokens"] > 0) == name.startswith("slowfast"), (section, name)
            assert data["ran"][f"{section}.{name}"]["ok"] is True, (section, name)
    # Each path counted what it should: K/V once per call (cached) or once per step (re-projected), base: nothing.
    layers = len(data["hybrid_layers"])
    assert layers == 2
    ran = data["ran"]
    assert ran["decode.slowfast_cached"]["kv_projections_total"] == layers
    assert (
        ran["decode.slowfast_reprojected"]["kv_projections_total"]
        == layers * ran["decode.slowfast_reprojected"]["steps"]
    )
    assert ran["decode.base"]["per_step"] == {"slow_contexts_created": 0}
    for kind, contexts in (("base", 0), ("slowfast", 1)):  # compiled = eager tokens, and no graph made per token
        assert ran[f"decode.{kind}_compiled"]["timed_call"] == {"graphs_made": 0, "recompiles": 0}
        assert ran[f"decode.{kind}_compiled"]["tokens_equal_eager"] is True
        assert ran[f"decode.{kind}_compiled"]["slow_contexts"] == 4 * contexts  # 2 eager + 2 compiled generates
    assert ran["memory.slowfast_32"]["steps_with_slow_reads"] == [1, 2, 3, 4]
    assert ran["train.slowfast_8"]["gates_moved"] is True
    # Fast tokens: 4 fast frames of 16 tokens + newline + 40 text tokens, whatever the slow-fast frame count.
    assert data["memory"]["slowfast_32"]["llm_tokens"] == data["prefill"]["base"]["llm_tokens"] == 4 * 16 + 1 + 40
    assert data["memory"]["base_32"]["llm_tokens"] == 32 * 16 + 1 + 40
    assert data["memory"]["slowfast_32"]["slow_tokens"] == 32 * 16
    assert set(data["ratios"]) >= {
        "prefill_slowfast_over_base",
        "decode_cached_over_base",
        "memory_32_slowfast_over_base",
    }
    markdown = out.with_suffix(".md").read_text()
    assert "| decode.slowfast_reprojected | 16 |" in markdown and "Path checks: 14 of 14 passed." in markdown


def test_inputs_are_what_the_stock_processor_returns(gpu):
    from slowfast_adapter.tools.tiny import build_tiny_llava_onevision, random_video

    model, processor = build_tiny_llava_onevision()
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    stock = processor(text=[prompt], videos=[random_video(12)], return_tensors="pt")
    ours = gpu.video_inputs(model, 12, text_tokens=20)
    video_id = model.config.video_token_id
    assert (ours["input_ids"] == video_id).sum() == (stock["input_ids"] == video_id).sum()
    assert ours["pixel_values_videos"].shape == stock["pixel_values_videos"].shape
    assert ours["input_ids"].shape[1] == 20 + (stock["input_ids"] == video_id).sum()
    with torch.no_grad():  # and the base model accepts them (its placeholder count check)
        assert model(**ours, logits_to_keep=1).logits.shape[:2] == (1, 1)


def test_one_failure_is_recorded_and_the_others_still_run(gpu, tmp_path):
    args = argparse.Namespace(time_limit=60.0, out=tmp_path / "gpu.json", device="cpu")
    bench = gpu.Benchmark(args, {"device": "cpu"})

    def raises(entry):
        entry["median_s"] = 1.0  # numbers measured before the failure are kept
        raise RuntimeError("boom")

    def out_of_memory(entry):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 70 GiB")

    bench.measure("decode", "broken", raises)
    bench.measure("memory", "base_1536", out_of_memory)
    bench.measure("prefill", "wrong_path", lambda entry: (False, {"slow_reads": 0}))
    bench.measure("prefill", "fine", lambda entry: (True, {"slow_reads": 4}))
    bench.args.time_limit = 0
    bench.measure("train", "late", lambda entry: (True, {}))
    data = json.loads(args.out.read_text())
    assert data["decode"]["broken"]["median_s"] == 1.0 and data["errors"]["decode.broken"] == "RuntimeError: boom"
    assert data["memory"]["base_1536"]["result"] == "OOM" and "memory.base_1536" not in data["errors"]  # a result
    assert data["ran"]["prefill.wrong_path"]["ok"] is False and "prefill.wrong_path" in data["errors"]
    assert data["ran"]["prefill.fine"] == {"ok": True, "slow_reads": 4}
    assert "train.late" in data["skipped"] and "train.late" not in data["ran"]
    assert data["ok"] is False


def test_slowfast_overrides_are_checked_before_anything_runs(gpu, capsys):
    args = gpu.parse_args(["--tiny", "--slowfast", "min_fast_frames=2", "--slowfast", "query_tokens=all"])
    assert args.overrides == {"hybrid_layer_interval": 2, "min_fast_frames": 2, "query_tokens": "all"}
    assert gpu.slowfast_config(args, 32).min_fast_frames == 2
    with pytest.raises(SystemExit):
        gpu.parse_args(["--tiny", "--slowfast", "no_such_field=1"])
    assert "no_such_field" in capsys.readouterr().err
