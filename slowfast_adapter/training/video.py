"""Reading video frames: decord first, PyAV where decord is missing; unreadable files get a clear error.

Two ways to choose frames, the two that video MLLMs use:
- `num_frames=N`: N frames spread uniformly over the whole video (first and last included);
- `fps=F, max_frames=M`: one frame every 1/F seconds of the video's own timeline; when that gives more
  than M frames, M frames spread uniformly instead (LLaVA-Video's rule), so long videos stay bounded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class VideoReadError(ValueError):
    """A video file that cannot be read; the message names the file."""


@dataclass
class VideoClip:
    """Frames read from a video file.

    frames: uint8 [T, H, W, 3] RGB; indices: [T] the frame numbers they came from;
    native_fps: the file's frame rate; total_frames: number of frames in the file.
    """

    frames: np.ndarray
    indices: np.ndarray
    native_fps: float
    total_frames: int
    backend: str

    @property
    def timestamps(self) -> np.ndarray:
        """[T] seconds from the start of the video of each frame."""
        return self.indices / self.native_fps

    def metadata(self):
        """A `transformers.video_utils.VideoMetadata` for processors that print frame times (Qwen3-VL)."""
        from transformers.video_utils import VideoMetadata

        height, width = self.frames.shape[1:3]
        return VideoMetadata(
            total_num_frames=self.total_frames,
            fps=self.native_fps,
            width=width,
            height=height,
            duration=self.total_frames / self.native_fps,
            video_backend=self.backend,
            frames_indices=self.indices.tolist(),
        )


def uniform_indices(total: int, num_frames: int) -> np.ndarray:
    """`num_frames` frame indices spread uniformly over `total` frames (first and last included)."""
    return np.linspace(0, total - 1, num_frames).round().astype(np.int64)


def sample_indices(
    total: int,
    native_fps: float,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    multiple: int = 1,
) -> np.ndarray:
    """Frame indices to read from a video of `total` frames at `native_fps`.

    Exactly one of `num_frames` (uniform) or `fps` (a target rate, capped at `max_frames` by uniform
    sampling) must be given. Always at least one frame. With `fps`, `multiple` > 1 rounds the frame count
    down to a multiple of it (at least `multiple`, re-spread uniformly), as fast-token pooling strides need.
    """
    if total < 1:
        raise ValueError("The video has no frames.")
    if (num_frames is None) == (fps is None):
        raise ValueError("Give exactly one of num_frames (uniform sampling) or fps (target frame rate).")
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
        return uniform_indices(total, num_frames)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}.")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}.")
    step = max(native_fps / fps, 1.0)  # never more frames than the file has
    indices = np.unique(np.arange(0, total, step).round().astype(np.int64).clip(0, total - 1))
    if max_frames is not None and len(indices) > max_frames:
        indices = uniform_indices(total, max_frames)
    if multiple > 1 and len(indices) % multiple:
        indices = uniform_indices(total, max(multiple, len(indices) // multiple * multiple))
    return indices


def read_clip(
    path: str | os.PathLike,
    num_frames: int | None = None,
    *,
    fps: float | None = None,
    max_frames: int | None = None,
    multiple: int = 1,
    backend: str = "auto",
) -> VideoClip:
    """Read frames of `path` (uniform `num_frames`, or `fps` capped at `max_frames`) with their frame numbers.

    `multiple`: with `fps`, round the frame count down to a multiple of it (see `sample_indices`).

    backend: 'decord', 'pyav', or 'auto' (decord when installed, falling back to PyAV if it fails).
    Raises `VideoReadError` naming the file when no backend can read it.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"Video file {path} does not exist.")
    sample_indices(1, 1.0, num_frames=num_frames, fps=fps, max_frames=max_frames)  # argument errors first
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}.")
    if backend == "auto":
        try:
            import decord  # noqa: F401

            backends = ["decord", "pyav"]  # PyAV also covers the odd stream decord mis-sizes
        except ImportError:
            backends = ["pyav"]
    elif backend in ("decord", "pyav"):
        backends = [backend]
    else:
        raise ValueError(f"backend must be 'auto', 'decord' or 'pyav', got {backend!r}.")
    errors = []
    for name in backends:
        try:
            reader = {"decord": _read_decord, "pyav": _read_pyav}[name]
            return reader(path, dict(num_frames=num_frames, fps=fps, max_frames=max_frames, multiple=multiple))
        except Exception as err:  # decoders raise many types; all mean the same thing to the caller
            errors.append(f"{name}: {err}")
    raise VideoReadError(f"Cannot read video {path} ({'; '.join(errors)}).")


def read_video(
    path: str | os.PathLike,
    num_frames: int | None = None,
    *,
    fps: float | None = None,
    max_frames: int | None = None,
    backend: str = "auto",
) -> np.ndarray:
    """Read RGB frames of `path` as uint8 [T, H, W, 3]; see `read_clip` for the sampling arguments."""
    return read_clip(path, num_frames, fps=fps, max_frames=max_frames, backend=backend).frames


def _read_decord(path: Path, sampling: dict) -> VideoClip:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    total = len(reader)
    if total == 0:
        raise VideoReadError(f"Video {path} has no frames.")
    native_fps = float(reader.get_avg_fps()) or 1.0
    indices = sample_indices(total, native_fps, **sampling)
    frames = reader.get_batch(indices.tolist()).asnumpy()
    return VideoClip(frames, indices, native_fps, total, "decord")


def _read_pyav(path: Path, sampling: dict) -> VideoClip:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise VideoReadError(f"Video {path} has no frames.")
    native_fps = float(rate) if rate else 1.0
    indices = sample_indices(len(frames), native_fps, **sampling)
    return VideoClip(np.stack([frames[i] for i in indices]), indices, native_fps, len(frames), "pyav")
