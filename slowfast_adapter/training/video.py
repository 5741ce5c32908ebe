"""Moved to `slowfast_adapter.inference.video`; this alias keeps old imports working."""

from ..inference.video import (  # noqa: F401
    VideoClip,
    VideoReadError,
    read_clip,
    read_video,
    sample_indices,
    select_frames,
    uniform_indices,
)
