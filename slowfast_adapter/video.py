"""Reading video frames: decord first, PyAV where decord is missing; unreadable files get a clear error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class VideoReadError(ValueError):
    """A video file that cannot be read; the message names the file."""


def uniform_indices(total: int, num_frames: int) -> np.ndarray:
    """`num_frames` frame indices spread uniformly over `total` frames (first and last included)."""
    return np.linspace(0, total - 1, num_frames).round().astype(np.int64)


def read_video(path: str | os.PathLike, num_frames: int, *, backend: str = "auto") -> np.ndarray:
    """Read `num_frames` uniformly sampled RGB frames of `path` as uint8 [T, H, W, 3].

    backend: 'decord', 'pyav', or 'auto' (decord when installed, falling back to PyAV if it fails).
    """
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"Video file {path} does not exist.")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
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
            return {"decord": _read_decord, "pyav": _read_pyav}[name](path, num_frames)
        except Exception as err:  # decoders raise many types; all mean the same thing to the caller
            errors.append(f"{name}: {err}")
    raise VideoReadError(f"Cannot read video {path} ({'; '.join(errors)}).")


def _read_decord(path: Path, num_frames: int) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    if len(reader) == 0:
        raise VideoReadError(f"Video {path} has no frames.")
    return reader.get_batch(uniform_indices(len(reader), num_frames).tolist()).asnumpy()


def _read_pyav(path: Path, num_frames: int) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise VideoReadError(f"Video {path} has no frames.")
    return np.stack([frames[i] for i in uniform_indices(len(frames), num_frames)])
