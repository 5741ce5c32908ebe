"""The needle data generator and a miniature run of `slowfast-adapter demo` (the full run is the README's)."""

from __future__ import annotations

import json

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


def test_demo_runs_end_to_end_in_miniature(tmp_path):
    config = DemoConfig(
        output_dir=str(tmp_path / "demo"), num_pretrain=16, num_train=16, num_val=8, num_test=8,
        hidden_size=32, intermediate_size=64, batch_size=4, pretrain_steps=3, adapter_steps=3, eval_every=3,
    )  # fmt: skip
    summary = run(config, log=lambda *_: None)
    assert [r["setting"][:3] for r in summary["results"]] == ["(a)", "(b)", "(c)", "(d)"]
    flops = {r["setting"][:3]: r["llm_prefill_flops"] for r in summary["results"]}
    assert 0 <= summary["results"][2]["looked_at_needle"] <= 1  # where it looked, on the slow-fast adapter
    assert "looked_at_needle" not in summary["results"][1]
    assert flops["(b)"] < flops["(c)"] < flops["(d)"]  # the slow branch costs something; native tokens most
    written = json.loads((tmp_path / "demo/results.json").read_text())
    assert written["results"] == summary["results"]
    assert (tmp_path / "demo/results.md").read_text().startswith("| setting |")
    assert (tmp_path / "demo/results.png").stat().st_size > 1000
    assert (tmp_path / "demo/adapter/adapter_model.safetensors").exists()
