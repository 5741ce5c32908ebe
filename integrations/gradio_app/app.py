"""A Gradio demo of a slow-fast adapter: ask about a video, see the slow-fast answer next to the fast-only one.

    python integrations/gradio_app/app.py                      # the demo's model (run `slowfast-adapter demo` first)
    python integrations/gradio_app/app.py --base BASE --adapter ADAPTER --samples VIDEO_DIR

Pick a sample video or upload one, ask a question: the app shows the answer with the slow path (slow-fast) and
without it (fast tokens only), the fast frames (what the pooled fast tokens summarise, drawn in pixel space), and a
per-frame heat map of how much the answer's tokens read each frame's slow tokens. Follow-up questions on the same
video reuse its encoded features. The endpoint `/ask` takes (video, question); see README.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from figures import heat_map
from video_qa import DEMO_QUESTION, Answer, VideoQA

from slowfast_adapter.inference.media import hide_path

DEMO_DIR = Path("demo-output")
DEFAULTS = {"base": DEMO_DIR / "pretrained-base", "adapter": DEMO_DIR / "adapter", "samples": DEMO_DIR / "data/test"}


# ------------------------------------------------------------------------------------------------ samples
def sample_videos(folder: str | Path | None, limit: int = 12) -> dict[str, str]:
    """Label -> path of the first `limit` mp4 files in `folder`, sorted by name. When the folder's annotation file
    (`<folder>.jsonl` beside it, as `slowfast-adapter demo` writes) says where a needle is, the label says too."""
    if folder is None or not Path(folder).is_dir():
        return {}
    folder = Path(folder)
    notes = {}
    annotations = folder.parent / f"{folder.name}.jsonl"
    if annotations.is_file():
        for line in annotations.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            needle = record.get("needle")
            if needle:
                notes[Path(record["video"]).name] = f"{needle['color']} square in frame {needle['frame']}"
    paths = sorted(folder.glob("*.mp4"))[:limit]
    return {(f"{p.stem} ({notes[p.name]})" if p.name in notes else p.stem): str(p) for p in paths}


# ------------------------------------------------------------------------------------------------ the UI
def _enlarge(image: np.ndarray, at_least: int = 160) -> np.ndarray:
    """Nearest-neighbour upscaling of small frames for display (the demo's videos are 32 px)."""
    factor = max(1, -(-at_least // max(image.shape[:2])))
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def status_line(answer: Answer) -> str:
    stats = answer.stats
    if answer.reused:
        return f"video features reused (cache hits: {stats['hits']}; encoded once: {stats['misses']} miss)"
    return "video encoded on this question; follow-up questions on it reuse its features"


def public_message(error: Exception, video: str) -> str:
    """`error` as the browser may see it: the video named by its file name, never by the server's (temporary)
    path or folder."""
    return hide_path(str(error), video, Path(video).name)


def build_app(qa: VideoQA, samples: dict[str, str], *, title: str = "slow-fast adapter demo") -> gr.Blocks:
    """The Blocks app around `qa`: a sample list and upload, a question, and what `VideoQA.ask` answers."""

    def ask(video: str | None, question: str) -> tuple[Any, ...]:
        if not video:
            raise gr.Error("Pick a sample video or upload one first.")
        try:
            answer = qa.ask(video, question)
        except (OSError, ValueError) as error:  # unreadable video, frame count the pooling cannot take, ...
            raise gr.Error(public_message(error, video)) from error
        gallery = [(_enlarge(frame.image), frame.caption) for frame in answer.fast_frames]
        fast = sorted({i for frame in answer.fast_frames for i in frame.units})
        values = {"unit": answer.unit, "timestamps": answer.timestamps, "per_frame": answer.per_frame, "fast": fast}
        figure = heat_map(answer.per_frame, answer.timestamps, fast=fast, unit=answer.unit)
        return answer.slowfast, answer.fast_only, gallery, figure, values, status_line(answer)

    config = qa.model.slowfast_config
    with gr.Blocks(title=title, analytics_enabled=False) as app:  # no calls home: it runs offline
        gr.Markdown(
            f"## {title}\nThe slow-fast answer reads every frame's tokens through the hybrid layers "
            f"{qa.model.hybrid_layer_indices}; the fast-only answer sees only the pooled fast tokens (every "
            f"{config.temporal_sampling_stride}th frame, {config.temporal_pooling_stride} averaged). "
            f"{qa.num_frames} frames are read from each video."
        )
        with gr.Row():
            with gr.Column(scale=1):
                sample = gr.Dropdown(list(samples), value=None, label="Sample video", interactive=True)
                video = gr.Video(label="Video (or upload one)", sources=["upload"], height=220)
                question = gr.Textbox(DEMO_QUESTION, label="Question", lines=1)
                button = gr.Button("Ask", variant="primary")
            with gr.Column(scale=1):
                slowfast = gr.Textbox(label="Slow-fast answer (slow path on)", interactive=False)
                fast_only = gr.Textbox(label="Fast-only answer (slow_path_disabled)", interactive=False)
                status = gr.Markdown("")
                gallery = gr.Gallery(
                    label="Fast frames: the mean of the frames each fast frame pools (the model pools their tokens)",
                    columns=4,
                    height=200,
                    format="png",
                    object_fit="contain",
                )
        plot = gr.Plot(label="Where it looked")
        with gr.Accordion("Per-frame values", open=False):
            values = gr.JSON(label="unit, seconds and slow-token reading of each, and those in the fast tokens")

        sample.change(lambda label: samples.get(label), sample, video, api_name=False)
        outputs = [slowfast, fast_only, gallery, plot, values, status]
        button.click(ask, [video, question], outputs, api_name="ask")
        question.submit(ask, [video, question], outputs, api_name=False)
    return app


# ------------------------------------------------------------------------------------------------ command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=None, help=f"base model folder (default {DEFAULTS['base']})")
    parser.add_argument("--adapter", default=None, help=f"slow-fast adapter folder (default {DEFAULTS['adapter']})")
    parser.add_argument("--samples", default=None, help=f"folder of sample mp4 videos (default {DEFAULTS['samples']})")
    parser.add_argument(
        "--frames", type=int, default=None, help="frames read per video (default: what the adapter's pooling is for)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=8, help="answer length (default 8)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    args = parser.parse_args(argv)
    missing = [name for name in ("base", "adapter") if not Path(getattr(args, name) or DEFAULTS[name]).exists()]
    if missing:
        given = [name for name in missing if getattr(args, name) is not None]
        if given:
            parser.error(f"--{given[0]} {getattr(args, given[0])} does not exist.")
        parser.error(
            f"The demo's model is missing ({DEFAULTS[missing[0]]}): run `slowfast-adapter demo` first, or pass "
            "--base/--adapter."
        )
    args.base, args.adapter = args.base or DEFAULTS["base"], args.adapter or DEFAULTS["adapter"]
    args.samples = args.samples or DEFAULTS["samples"]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        qa = VideoQA.load(args.base, args.adapter, num_frames=args.frames, max_new_tokens=args.max_new_tokens)
    except (OSError, ValueError) as error:  # AdapterError (a ValueError), a frame count the pooling cannot take
        sys.exit(f"error: {error}")
    samples = sample_videos(args.samples)
    print(f"{args.base} + {args.adapter}: {qa.num_frames} frames per video, {len(samples)} samples", file=sys.stderr)
    build_app(qa, samples).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
