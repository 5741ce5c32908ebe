"""Video reading (issue 12): PyAV keeps only the frames it returns, frame times come from the file's timestamps
(variable frame rates), and still images or audio-only files get a clear error."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
from PIL import Image

from slowfast_adapter.inference.video import VideoReadError, read_clip, read_video, select_frames
from slowfast_adapter.tools.tiny import write_mp4

BACKENDS = ["decord", "pyav"]

# 20 frames at 10 fps, then 20 frames at 2 fps: frame t is shown at VFR_TIMES[t] seconds.
VFR_TIMES = [0.1 * t for t in range(20)] + [2.0 + 0.5 * t for t in range(20)]


def moving_video(num_frames: int, size: int = 64) -> np.ndarray:
    """uint8 [T, size, size, 3]: a ramp sliding two pixels per frame, so every frame differs."""
    x = np.arange(size)
    t = np.arange(num_frames)
    ramp = ((x[None, None, :] + 2 * t[:, None, None]) * 4 % 256).astype(np.uint8)  # [T, 1, size]
    frames = np.repeat(ramp, size, axis=1)[..., None].repeat(3, axis=-1)
    frames[..., 1] = 255 - frames[..., 1]
    return frames


def grey_video(num_frames: int, size: int = 32) -> np.ndarray:
    """uint8 [T, size, size, 3]: frame t is a flat grey of value 5 t."""
    greys = 5 * np.arange(num_frames, dtype=np.uint8)
    return np.broadcast_to(greys[:, None, None, None], (num_frames, size, size, 3))


@pytest.fixture(scope="module")
def vfr_mp4(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("vfr") / "vfr.mp4", grey_video(40), times=VFR_TIMES)


def test_select_frames_by_time():
    times = np.array(VFR_TIMES)
    # num_frames: nearest to 8 times spread uniformly over [0, 11.5] s, not 8 frame numbers.
    assert select_frames(times, num_frames=8).tolist() == [0, 16, 23, 26, 29, 32, 36, 39]
    # fps: one frame per second over the 12 s the file lasts (its last frame is shown 0.5 s).
    np.testing.assert_allclose(times[select_frames(times, fps=1)], np.arange(12), atol=1e-9)
    assert len(select_frames(times, fps=1, max_frames=5)) == 5
    assert len(select_frames(times, fps=1, multiple=5)) == 10
    constant = np.arange(80) / 8.0  # the constant-rate rules are unchanged
    assert select_frames(constant, fps=1).tolist() == list(range(0, 80, 8))
    assert select_frames(np.arange(20) / 8.0, num_frames=5).tolist() == [0, 5, 10, 14, 19]  # ties round to even


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_frame_rate_uniform_frames_and_times(vfr_mp4, backend):
    clip = read_clip(vfr_mp4, 8, backend=backend)
    assert clip.total_frames == 40
    assert clip.indices.tolist() == [0, 16, 23, 26, 29, 32, 36, 39]
    np.testing.assert_allclose(clip.timestamps, [0, 1.6, 3.5, 5.0, 6.5, 8.0, 10.0, 11.5], atol=1e-4)
    np.testing.assert_allclose(clip.frames.reshape(8, -1).mean(1), 5 * clip.indices, atol=3)
    meta = clip.metadata()  # processors compute times as frames_indices / fps (Qwen3-VL's prompt text)
    np.testing.assert_allclose(meta.timestamps, clip.timestamps, atol=1e-4)
    assert meta.duration == pytest.approx(12.0, abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_frame_rate_target_fps(vfr_mp4, backend):
    clip = read_clip(vfr_mp4, fps=1, backend=backend)
    np.testing.assert_allclose(clip.timestamps, np.arange(12), atol=1e-4)  # one frame per second, not 6 in 1.9 s
    assert clip.indices.tolist() == [0, 10, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38]
    np.testing.assert_allclose(clip.frames.reshape(12, -1).mean(1), 5 * clip.indices, atol=3)


def test_backends_agree_on_variable_frame_rate(vfr_mp4):
    for sampling in ({"num_frames": 11}, {"fps": 3}, {"fps": 3, "max_frames": 7}):
        decord_clip = read_clip(vfr_mp4, **sampling, backend="decord")
        pyav_clip = read_clip(vfr_mp4, **sampling, backend="pyav")
        assert decord_clip.indices.tolist() == pyav_clip.indices.tolist(), sampling
        np.testing.assert_allclose(decord_clip.timestamps, pyav_clip.timestamps, atol=1e-4)
        np.testing.assert_array_equal(decord_clip.frames, pyav_clip.frames)


class DecodeSpy:
    """Stands in for `av.open`: counts the frames PyAV converts to arrays and the most such arrays alive at once.

    PyAV's arrays live in FFmpeg's buffers, which tracemalloc does not see; counting them is what holds.
    """

    def __init__(self, real_open):
        self.real_open, self.converted, self.alive, self.most_alive = real_open, 0, 0, 0

    def __call__(self, *args, **kwargs):
        return _SpyContainer(self.real_open(*args, **kwargs), self)

    def converted_array(self, array: np.ndarray) -> np.ndarray:
        self.converted += 1
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(array, self._freed)
        return array

    def _freed(self):
        self.alive -= 1


class _SpyContainer:
    def __init__(self, container, spy: DecodeSpy):
        self._container, self._spy = container, spy

    def __getattr__(self, name):
        return getattr(self._container, name)

    def __enter__(self):
        self._container.__enter__()
        return self

    def __exit__(self, *exc):
        return self._container.__exit__(*exc)

    def decode(self, *args, **kwargs):
        for frame in self._container.decode(*args, **kwargs):
            yield _SpyFrame(frame, self._spy)


class _SpyFrame:
    def __init__(self, frame, spy: DecodeSpy):
        self._frame, self._spy = frame, spy

    def __getattr__(self, name):
        return getattr(self._frame, name)

    def to_ndarray(self, *args, **kwargs):
        return self._spy.converted_array(self._frame.to_ndarray(*args, **kwargs))


@pytest.mark.parametrize("keyframe_interval", [None, 12])  # one long GOP; many (the reader seeks between them)
def test_pyav_keeps_only_the_selected_frames(tmp_path, monkeypatch, keyframe_interval):
    import av

    length = 300
    path = write_mp4(tmp_path / "long.mp4", moving_video(length), fps=25, keyframe_interval=keyframe_interval)
    spy = DecodeSpy(av.open)
    monkeypatch.setattr(av, "open", spy)
    clip = read_clip(path, 8, backend="pyav")
    by_rate = read_clip(path, fps=2.5, backend="pyav")  # every 10th frame, across the key frames
    monkeypatch.undo()
    # Decoding the whole file into arrays held all 300 frames; only the 8 + 30 returned ones may be converted.
    assert spy.converted == 8 + 30 and spy.most_alive <= 30, (spy.converted, spy.most_alive)
    reference = read_clip(path, 8, backend="decord")
    assert clip.indices.tolist() == reference.indices.tolist() == [0, 43, 85, 128, 171, 214, 256, 299]
    np.testing.assert_array_equal(clip.frames, reference.frames)
    assert by_rate.indices.tolist() == list(range(0, length, 10))
    np.testing.assert_array_equal(by_rate.frames, read_clip(path, fps=2.5, backend="decord").frames)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("name", ["still.png", "still.jpg", "renamed_png.mp4"])
def test_still_image_is_not_a_video(tmp_path, backend, name):
    image = Image.fromarray(moving_video(1, 32)[0])
    path = tmp_path / name
    image.save(path, format="JPEG" if name.endswith(".jpg") else "PNG")
    with pytest.raises(VideoReadError, match=f"{name} holds a single still image .*, not a video"):
        read_video(path, 4, backend=backend)


def _write_audio_only_mp4(path):
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for number in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, number * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_audio_only_file_has_no_video_stream(tmp_path, backend):
    path = _write_audio_only_mp4(tmp_path / "speech.mp4")
    with pytest.raises(VideoReadError, match=r"speech.mp4 has no video stream \(audio only\)"):
        read_video(path, 4, backend=backend)


def test_constant_rate_metadata_keeps_frame_numbers(tmp_path):
    path = write_mp4(tmp_path / "ramp.mp4", grey_video(30), fps=10)
    for backend in BACKENDS:
        clip = read_clip(path, 4, backend=backend)
        assert clip.metadata().frames_indices == [0, 10, 19, 29]
        np.testing.assert_allclose(clip.timestamps, [0, 1.0, 1.9, 2.9], atol=1e-4)


def _imported_by(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `code`."""
    import subprocess
    import sys

    probe = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split())


def test_video_reading_and_the_app_model_import_no_training_code():
    """`slowfast_adapter.inference` (and the Gradio app's model side, which reads video through it) load nothing
    from `slowfast_adapter.training` nor accelerate: the `[eval]` extra has only the video readers."""
    from pathlib import Path

    imported = _imported_by("import slowfast_adapter.inference.video")
    assert "slowfast_adapter.inference.video" in imported  # the probe really loaded it
    assert not {m for m in imported if m.startswith("slowfast_adapter.training") or m.split(".")[0] == "accelerate"}
    app = Path(__file__).parents[1] / "integrations" / "gradio_app"
    imported = _imported_by(f"sys.path.insert(0, {str(app)!r})\nimport video_qa")
    assert "video_qa" in imported and "slowfast_adapter.inference.video" in imported
    assert not {m for m in imported if m.startswith("slowfast_adapter.training")}
