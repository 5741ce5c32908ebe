"""The README's main command end to end, and video reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slowfast_adapter.inference.video import VideoReadError, read_video, uniform_indices
from slowfast_adapter.tools.tiny import write_mp4

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_command_runs_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "slowfast_adapter.cli",
        "quickstart",
        "--recipe",
        str(REPO / "recipes/quickstart.yaml"),
    ]
    cmd += ["--output-dir", str(tmp_path / "qs"), "--steps", "30"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "adapter saved" in result.stdout
    summary = json.loads((tmp_path / "qs/summary.json").read_text())
    assert len(summary["losses"]) == 30 and summary["losses"][-1] < summary["losses"][0]
    assert set(summary["answers"]) == {"red", "blue"}
    assert sorted(p.name for p in (tmp_path / "qs/adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_read_video_samples_uniformly(tmp_path, backend):
    frames = np.zeros((20, 32, 64, 3), dtype=np.uint8)
    for t in range(20):
        frames[t] = 10 * t  # frame t is a flat grey of value 10 t
    path = write_mp4(tmp_path / "ramp.mp4", frames)
    video = read_video(path, 5, backend=backend)
    assert video.shape == (5, 32, 64, 3) and video.dtype == np.uint8
    expected = 10 * uniform_indices(20, 5)
    np.testing.assert_allclose(video.reshape(5, -1).mean(1), expected, atol=3)


def test_unreadable_video_names_the_file(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video")
    for backend in ("decord", "pyav"):
        with pytest.raises(VideoReadError, match="broken.mp4"):
            read_video(bad, 4, backend=backend)
    with pytest.raises(VideoReadError, match="does not exist"):
        read_video(tmp_path / "missing.mp4", 4)


def test_auto_backend_falls_back_to_pyav(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (6, 32, 48, 3), dtype=np.uint8)
    path = write_mp4(tmp_path / "narrow.mp4", frames)  # decord 0.6 mis-sizes this stream
    assert read_video(path, 3).shape == (3, 32, 48, 3)
