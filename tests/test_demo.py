"""The needle data generator and a miniature run of `slowfast-adapter demo` (the full run is the README's)."""

from __future__ import annotations

import numpy as np
import pytest

from slowfast_adapter.core.pooling import plan_fast_frames, pool_fast_frames
from slowfast_adapter.demo.experiment import DemoConfig, run
from slowfast_adapter.demo.needle_data import COLORS, read_split, render, sample_specs, write_split
from slowfast_adapter.inference.video import read_video


def test_splits_are_reproducible_balanced_and_disjoint():
    first = sample_specs("train", 40, num_frames=32, size=32, needle_size=6)
    assert first == sample_specs("train", 40, num_frames=32, size=32, needle_size=6)
    assert {s.color for s in first} == set(COLORS) and len({s.color for s in first[:4]}) == 4
    test = sample_specs("test", 40, num_frames=32, size=32, needle_size=6)
    assert {s.seed for s in first}.isdisjoint({s.seed for s in test})


def test_the_needle_is_in_one_frame_only_and_survives_mp4(tmp_path):
    spec = sample_specs("val", 1, num_frames=32, size=32, needle_size=6)[0]
    frames = render(spec).astype(int)
    colour = np.array(COLORS[spec.color])
    chroma = np.abs(frames - frames.mean(-1, keepdims=True)).sum(-1)  # 0 for grey pixels
    assert (chroma.reshape(32, -1).max(-1) > 0).tolist() == [t == spec.frame for t in range(32)]
    path = write_split(tmp_path, "val", 1, num_frames=32)
    record = read_split(path)[0]
    decoded = read_video(tmp_path / record["video"], 32).astype(int)
    patch = decoded[spec.frame, spec.y + 2 : spec.y + 4, spec.x + 2 : spec.x + 4].reshape(-1, 3).mean(0)
    assert np.abs(patch - colour).max() < 40  # H.264 keeps the needle's colour
    assert record["conversations"][1]["value"] == spec.color


def test_fast_pooling_drops_or_dilutes_the_needle():
    import dataclasses

    import torch

    spec = sample_specs("test", 1, num_frames=32, size=32, needle_size=8)[0]
    plan = plan_fast_frames(32, DemoConfig().slowfast_config())  # keep every 4th frame, average pairs
    assert (plan.sampling_stride, plan.pooling_stride) == (4, 2)

    def chroma(x):  # strongest colour of any pixel (0 for grey)
        return np.abs(x - x.mean(-1, keepdims=True)).sum(-1).max()

    for frame, expected in ((8, 0.5), (9, 0.0)):  # a kept frame is averaged with one other; a skipped one is gone
        video = render(dataclasses.replace(spec, frame=frame)).astype(np.float64)
        fast = pool_fast_frames(torch.from_numpy(video[None]), plan).numpy()
        assert chroma(fast) == pytest.approx(expected * chroma(video[frame]), abs=1e-9), frame


@pytest.mark.slow
def test_demo_runs_end_to_end_in_miniature(tmp_path):
    """A miniature run (3 steps per stage: too short to learn) whose reported numbers are reproduced from what it
    saved: the pretrained base and the adapter, reloaded in a fresh model, answer the test videos with the accuracies
    the demo reported for fast tokens only and slow-fast, and where it looked peaks at the needle's frame (read from
    the test split's own records) as often as reported."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import slowfast_adapter as sfa

    config = DemoConfig(
        output_dir=str(tmp_path / "demo"), num_pretrain=16, num_train=16, num_val=8, num_test=8,
        hidden_size=32, intermediate_size=64, batch_size=4, pretrain_steps=3, adapter_steps=3, eval_every=3,
    )  # fmt: skip
    summary = run(config, log=lambda *_: None)
    rows = {r["setting"][:3]: r for r in summary["results"]}
    assert list(rows) == ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)"]
    assert rows["(b)"]["llm_prefill_flops"] < rows["(c)"]["llm_prefill_flops"] < rows["(d)"]["llm_prefill_flops"]
    for pruned in (rows["(e)"], rows["(f)"]):  # the largest budget within (c)'s LLM FLOPs, at least the fast tokens
        assert rows["(b)"]["video_tokens"] < pruned["video_tokens"] < rows["(d)"]["video_tokens"]
        assert rows["(b)"]["llm_prefill_flops"] < pruned["llm_prefill_flops"] <= rows["(c)"]["llm_prefill_flops"]

    out = tmp_path / "demo"
    processor = AutoProcessor.from_pretrained(out / "pretrained-base")
    model = sfa.SlowFastModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(out / "pretrained-base"), out / "adapter"
    ).eval()
    records = read_split(out / "data" / "test.jsonl")
    videos = [read_video(out / "data" / r["video"], config.high_frames) for r in records]
    question = records[0]["conversations"][0]["value"].replace("<video>", "").strip()
    turn = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(turn, add_generation_prompt=True)
    inputs = processor(text=[prompt] * len(videos), videos=videos, return_tensors="pt", padding=True)

    def accuracy() -> float:
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers = [r["conversations"][1]["value"] for r in records]
        return sum(text.strip().startswith(a) for text, a in zip(texts, answers, strict=True)) / len(records)

    assert accuracy() == rows["(c)"]["accuracy"]
    with model.slow_path_disabled():
        assert accuracy() == rows["(b)"]["accuracy"]
    looked = sfa.where_it_looked(model, inputs)
    peaks = [looked.peak_frame(row) == r["needle"]["frame"] for row, r in enumerate(records)]
    assert sum(peaks) / len(peaks) == rows["(c)"]["looked_at_needle"]
    assert "looked_at_needle" not in rows["(b)"]
    assert (out / "results.md").read_text().startswith("| setting |")
    assert (out / "results.png").stat().st_size > 1000


@pytest.mark.slow
def test_order_task_runs_end_to_end_in_miniature(tmp_path):
    """`task=order` writes two-square videos whose squares the fast tokens skip, and reports rows (a)-(f) with the
    where-it-looked rates of both squares."""
    config = DemoConfig(
        output_dir=str(tmp_path / "demo"), task="order", num_pretrain=16, num_train=16, num_val=8, num_test=8,
        hidden_size=32, intermediate_size=64, batch_size=4, pretrain_steps=3, adapter_steps=3, eval_every=3,
        slowfast={**DemoConfig().slowfast, "slow_key_positions": "temporal"},
    )  # fmt: skip
    summary = run(config, log=lambda *_: None)
    assert [r["setting"][:3] for r in summary["results"]] == ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)"]
    assert set(summary["results"][2]["looked"]) == {"peak_at_a_square", "peak_at_first", "top2_both_squares"}
    records = read_split(tmp_path / "demo" / "data" / "test.jsonl")
    assert all(r["squares"][0]["frame"] % 4 and r["squares"][1]["frame"] % 4 for r in records)
    assert all(r["conversations"][1]["value"] == r["squares"][0]["color"] for r in records)
