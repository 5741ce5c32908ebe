"""Reading video frames: decord first, PyAV where decord is missing; unreadable files get a clear error.

Two ways to choose frames, the two that video MLLMs use:
- `num_frames=N`: N frames spread uniformly over the whole video (first and last included);
- `fps=F, max_frames=M`: one frame every 1/F seconds of the video's own timeline; when that gives more
  than M frames, M frames spread uniformly instead (LLaVA-Video's rule), so long videos stay bounded.

Frames are chosen and timed by their presentation timestamps (pts * time_base), so files with a variable
frame rate get the frames nearest to the wanted times and their true times. The PyAV reader decodes only up
to the frames it keeps (seeking to the key frame before a far target) and converts only those to RGB, so its
memory does not grow with the video's length.
"""

from __future__ import annotations

import math
import os
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class VideoReadError(ValueError):
    """A video file that cannot be read; the message names the file."""


@dataclass
class VideoClip:
    """Frames read from a video file.

    frames: uint8 [T, H, W, 3] RGB; indices: [T] the frame numbers they came from (presentation order);
    native_fps: the file's (average) frame rate; total_frames: number of frames in the file;
    times: [T] seconds of each frame from the file's first frame (presentation timestamps), None for
    `indices / native_fps`; duration: seconds from the first frame to the end of the last, None for
    `total_frames / native_fps`.
    """

    frames: np.ndarray
    indices: np.ndarray
    native_fps: float
    total_frames: int
    backend: str
    times: np.ndarray | None = None
    duration: float | None = None

    @property
    def timestamps(self) -> np.ndarray:
        """[T] seconds from the start of the video of each frame."""
        return self.indices / self.native_fps if self.times is None else self.times

    def metadata(self):
        """A `transformers.video_utils.VideoMetadata` for processors that print frame times (Qwen3-VL).

        Processors compute frame times as `frames_indices / fps`, so `frames_indices` holds each frame's time in
        units of 1/native_fps: the frame numbers on a constant-rate file, fractional positions on a file with a
        variable frame rate (which keeps the processor's times equal to `timestamps`).
        """
        from transformers.video_utils import VideoMetadata

        height, width = self.frames.shape[1:3]
        positions = np.asarray(self.timestamps, dtype=np.float64) * self.native_fps
        constant_rate = np.allclose(positions, self.indices, rtol=0, atol=0.01)
        return VideoMetadata(
            total_num_frames=self.total_frames,
            fps=self.native_fps,
            width=width,
            height=height,
            duration=self.total_frames / self.native_fps if self.duration is None else self.duration,
            video_backend=self.backend,
            frames_indices=self.indices.tolist() if constant_rate else np.round(positions, 6).tolist(),
        )


def uniform_indices(total: int, num_frames: int) -> np.ndarray:
    """`num_frames` frame indices spread uniformly over `total` frames (first and last included)."""
    return np.linspace(0, total - 1, num_frames).round().astype(np.int64)


def _check_sampling(num_frames: int | None, fps: float | None, max_frames: int | None, multiple: int) -> None:
    if (num_frames is None) == (fps is None):
        raise ValueError("Give exactly one of num_frames (uniform sampling) or fps (target frame rate).")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}.")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}.")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}.")


def _nearest_frames(times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """[K] index of the frame nearest in time to each of `targets` [K] seconds; `times` [N] increasing seconds.

    Interpolating the frame position and rounding it picks the nearer of the two frames around a target; the
    position is first rounded to 1/1000 of a frame so float noise cannot flip an exact tie (ties round to even,
    as `uniform_indices` does).
    """
    positions = np.interp(targets, times, np.arange(len(times), dtype=np.float64))
    return np.round(np.round(positions, 3)).astype(np.int64)


def _uniform_in_time(times: np.ndarray, num_frames: int) -> np.ndarray:
    """[num_frames] indices of the frames nearest to times spread uniformly from the first frame to the last."""
    return _nearest_frames(times, np.linspace(times[0], times[-1], num_frames))


def select_frames(
    times: np.ndarray,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    multiple: int = 1,
) -> np.ndarray:
    """Indices of the frames to read from a video whose frames are shown at `times` ([N] seconds, increasing).

    `num_frames`: the frames nearest to `num_frames` times spread uniformly from the first frame to the last
    (repeats allowed when the file has fewer frames). `fps`: the frame nearest to each tick every 1/fps seconds
    from the first frame to the end of the last one (each frame at most once), capped at `max_frames` by
    uniform sampling; `multiple` > 1 rounds that frame count down to a multiple of it (at least `multiple`,
    re-spread uniformly). Always at least one frame.
    """
    _check_sampling(num_frames, fps, max_frames, multiple)
    times = np.asarray(times, dtype=np.float64)
    if len(times) < 1:
        raise ValueError("The video has no frames.")
    if num_frames is not None:
        return _uniform_in_time(times, num_frames)
    last_frame = times[-1] - times[-2] if len(times) > 1 else 0.0  # shown until the next would be
    span = times[-1] - times[0] + last_frame
    ticks = max(1, math.ceil(span * fps - 1e-6))  # ticks at exactly the end belong to the next frame
    indices = np.unique(_nearest_frames(times, times[0] + np.arange(ticks) / fps))
    if max_frames is not None and len(indices) > max_frames:
        indices = _uniform_in_time(times, max_frames)
    if multiple > 1 and len(indices) % multiple:
        indices = _uniform_in_time(times, max(multiple, len(indices) // multiple * multiple))
    return indices


def sample_indices(
    total: int,
    native_fps: float,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    multiple: int = 1,
) -> np.ndarray:
    """Frame indices to read from a constant-rate video of `total` frames at `native_fps`.

    Exactly one of `num_frames` (uniform) or `fps` (a target rate, capped at `max_frames` by uniform
    sampling) must be given. Always at least one frame. With `fps`, `multiple` > 1 rounds the frame count
    down to a multiple of it (at least `multiple`, re-spread uniformly), as fast-token pooling strides need.
    See `select_frames` for files whose frame times are known.
    """
    if total < 1:
        raise ValueError("The video has no frames.")
    times = np.arange(total, dtype=np.float64) / native_fps
    return select_frames(times, num_frames=num_frames, fps=fps, max_frames=max_frames, multiple=multiple)


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

    `multiple`: with `fps`, round the frame count down to a multiple of it (see `select_frames`).

    backend: 'decord', 'pyav', or 'auto' (decord when installed, falling back to PyAV if it fails).
    Raises `VideoReadError` naming the file when no backend can read it, or when it holds a still image or
    no video stream at all (checked with PyAV, whatever the backend, when PyAV is installed).
    """
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"Video file {path} does not exist.")
    _check_sampling(num_frames, fps, max_frames, multiple)  # argument errors first
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
    _check_holds_video(path)
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


def _is_image_format(format_name: str) -> bool:
    """Whether an FFmpeg demuxer name is one of its still-image readers (image2, png_pipe, jpeg_pipe, ...)."""
    return format_name.startswith("image2") or format_name.endswith("_pipe")


def _check_holds_video(path: Path) -> None:
    """Raise `VideoReadError` when `path` opens but holds a still image or no video stream.

    Files PyAV cannot open pass: the backends then report their own errors. Without PyAV nothing is checked.
    """
    try:
        import av
    except ImportError:
        return
    try:
        container = av.open(str(path))
    except Exception:  # FFmpeg raises many types for bad files; the readers will say why
        return
    with container:
        if container.streams.video and _is_image_format(container.format.name):
            codec = container.streams.video[0].codec_context.name
            raise VideoReadError(f"{path} holds a single still image ({codec}), not a video.")
        if not container.streams.video:
            kinds = sorted({stream.type for stream in container.streams})
            held = f"{' and '.join(kinds)} only" if kinds else "no streams at all"
            raise VideoReadError(f"{path} has no video stream ({held}).")


def _frame_times(times: np.ndarray, native_fps: float) -> np.ndarray:
    """[N] seconds of each frame from the first: `times` shifted to start at 0, or `index / native_fps` when the
    timestamps are not strictly increasing (missing or broken)."""
    times = np.asarray(times, dtype=np.float64)
    if len(times) > 1 and not np.all(np.diff(times) > 0):
        return np.arange(len(times), dtype=np.float64) / native_fps
    return times - times[0]


def _duration(times: np.ndarray, native_fps: float) -> float:
    """Seconds from the first frame to the end of the last, the last shown as long as the one before it."""
    last_frame = times[-1] - times[-2] if len(times) > 1 else 1.0 / native_fps
    return float(times[-1] - times[0] + last_frame)


def _clip(frames: np.ndarray, indices: np.ndarray, times: np.ndarray, native_fps: float, backend: str) -> VideoClip:
    """A `VideoClip` of the frames at `indices`, given the times [N] of all the file's frames."""
    return VideoClip(frames, indices, native_fps, len(times), backend, times[indices], _duration(times, native_fps))


def _read_decord(path: Path, sampling: dict) -> VideoClip:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    total = len(reader)
    if total == 0:
        raise VideoReadError(f"Video {path} has no frames.")
    native_fps = float(reader.get_avg_fps()) or 1.0
    # [N, 2] (start, end) seconds in float32; a list, since a slice makes decord decode every frame.
    starts = reader.get_frame_timestamp(list(range(total)))[:, 0]
    times = _frame_times(starts, native_fps)
    indices = select_frames(times, **sampling)
    frames = reader.get_batch(indices.tolist()).asnumpy()
    return _clip(frames, indices, times, native_fps, "decord")


class _SeekMiss(Exception):
    """A wanted frame did not come out of the decoder where its timestamp said it would."""


def _to_rgb(frame) -> np.ndarray:
    """uint8 [H, W, 3] RGB of a decoded `av.VideoFrame`."""
    return frame.to_ndarray(format="rgb24")


def _read_pyav(path: Path, sampling: dict) -> VideoClip:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        native_fps = float(rate) if rate else 1.0
        time_base = stream.time_base
        scanned = _scan_packets(container, stream)
    if scanned is None:  # no usable packet timestamps: count decoded frames instead
        with av.open(str(path)) as container:
            total = sum(1 for _ in container.decode(container.streams.video[0]))
        pts, keyframes, times = None, [], np.arange(total, dtype=np.float64) / native_fps
    else:
        pts, keyframes = scanned
        times = _frame_times(np.array(pts, dtype=np.float64) * float(time_base), native_fps)
    if len(times) == 0:
        raise VideoReadError(f"Video {path} has no frames.")
    indices = select_frames(times, **sampling)
    wanted = sorted(set(indices.tolist()))
    found = None
    if pts is not None:
        try:
            with av.open(str(path)) as container:
                found = _decode_by_pts(container, container.streams.video[0], wanted, pts, keyframes)
        except _SeekMiss:
            found = None
    if found is None:
        with av.open(str(path)) as container:
            found = _decode_by_count(container, container.streams.video[0], wanted)
    if len(found) < len(wanted):
        raise VideoReadError(f"Video {path} ended before frame {max(wanted)} ({len(times)} frames expected).")
    return _clip(np.stack([found[i] for i in indices.tolist()]), indices, times, native_fps, "pyav")


def _scan_packets(container, stream) -> tuple[list[int], list[int]] | None:
    """(pts of every frame in presentation order, pts of the key frames), in `stream.time_base` units, read from
    the packets without decoding. None when a packet has no pts or two frames share one."""
    pts, keyframes = [], []
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's final empty packet
            continue
        if packet.pts is None:
            return None
        pts.append(packet.pts)
        if packet.is_keyframe:
            keyframes.append(packet.pts)
    pts.sort()
    if len(set(pts)) < len(pts):
        return None
    return pts, sorted(keyframes)


def _decode_by_pts(container, stream, wanted: list[int], pts: list[int], keyframes: list[int]) -> dict:
    """{index: uint8 [H, W, 3]} for the frame indices `wanted` (sorted), found by their `pts` (all frames').

    Decodes forward from the current position, seeking to the key frame before a target when that key frame
    lies past the decoder's position; only the wanted frames are converted to RGB. Raises `_SeekMiss` when the
    decoder skips a wanted timestamp.
    """
    stream.thread_type = "AUTO"
    found, decoded, position = {}, None, None
    for index in wanted:
        target = pts[index]
        key = keyframes[bisect_right(keyframes, target) - 1] if keyframes and keyframes[0] <= target else None
        behind = key is not None and key > (pts[0] if position is None else position)
        if behind:  # the target's key frame is ahead of the decoder: skip there
            container.seek(key, stream=stream)
        if behind or decoded is None:
            decoded = container.decode(stream)
        for frame in decoded:
            if frame.pts is None:
                raise _SeekMiss
            position = frame.pts
            if position == target:
                found[index] = _to_rgb(frame)
                break
            if position > target:
                raise _SeekMiss
        else:
            raise _SeekMiss
    return found


def _decode_by_count(container, stream, wanted: list[int]) -> dict:
    """{index: uint8 [H, W, 3]} for the frame indices `wanted` (sorted), counting decoded frames from the start."""
    stream.thread_type = "AUTO"
    found, wanted_set = {}, set(wanted)
    for number, frame in enumerate(container.decode(stream)):
        if number in wanted_set:
            found[number] = _to_rgb(frame)
        if number >= wanted[-1]:
            break
    return found
