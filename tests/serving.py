"""Shared by the serving tests: a tiny base with two saved adapters, mp4 videos, a live server on a free port, and
reference answers from freshly loaded models (`SlowFastModel.from_pretrained` + `generate`)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from conftest import open_gates
from transformers import AutoModelForImageTextToText, AutoProcessor

import slowfast_adapter as sfa
from slowfast_adapter.inference.video import read_clip
from slowfast_adapter.tools.tiny import random_video, save_tiny, write_mp4

CONFIG = dict(min_fast_frames=2, temporal_sampling_stride=2, temporal_pooling_stride=2)
FRAMES = 8  # read per video: 2 fast frames at strides 2 x 2
QUESTIONS = ["What is it?", "What color?", "How many frames?", "Describe the shapes."]


@dataclass
class Served:
    """Folders of a tiny base, its adapters by name, and videos (a media root)."""

    base: Path
    adapters: dict[str, Path]
    videos: Path
    names: list[str] = field(default_factory=list)  # video file names


def build_served(root: Path, family: str = "llava_onevision", num_videos: int = 4) -> Served:
    base_dir = save_tiny(family, root / "base")
    adapters = {}
    for seed, (name, gate) in enumerate([("alpha", 1.5), ("beta", -2.0)]):
        base = AutoModelForImageTextToText.from_pretrained(base_dir).eval()
        torch.manual_seed(seed)
        model = sfa.wrap(base, sfa.SlowFastConfig(**CONFIG))
        open_gates(model, gate, seed=seed)
        model.save_pretrained(root / name)
        adapters[name] = root / name
    videos = root / "videos"
    videos.mkdir()
    names = []
    for i in range(num_videos):
        write_mp4(videos / f"clip{i}.mp4", random_video(16, size=32, seed=10 + i))
        names.append(f"clip{i}.mp4")
    return Served(base_dir, adapters, videos, names)


def messages(video: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                         {"type": "text", "text": question}]}]  # fmt: skip


class Reference:
    """Answers of a freshly loaded base + adapter through `model.generate` on the frames `read_clip` gives."""

    def __init__(self, served: Served, adapter: str) -> None:
        base = AutoModelForImageTextToText.from_pretrained(served.base).eval()
        self.processor = AutoProcessor.from_pretrained(served.base)
        self.model = sfa.SlowFastModel.from_pretrained(base, served.adapters[adapter])
        self.videos = served.videos

    def tokens(self, video: str, question: str, max_new_tokens: int = 8) -> tuple[list[int], int]:
        """(new tokens up to and including the first end-of-text, fitted prompt length)."""
        clip = read_clip(self.videos / video, FRAMES)
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = self.processor(text=[prompt], videos=[clip.frames], video_metadata=[clip.metadata()],
                                do_sample_frames=False, return_tensors="pt")  # fmt: skip
        inputs.pop("token_type_ids", None)
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = output[0, inputs["input_ids"].shape[1] :].tolist()
        eos = self.model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos)
        end = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        return new[:end], self.model.prepare_inputs(**inputs).input_ids.shape[1]

    def text(self, video: str, question: str, max_new_tokens: int = 8) -> str:
        tokens, _ = self.tokens(video, question, max_new_tokens)
        return self.processor.decode(tokens, skip_special_tokens=True)


def wait_healthy(url: str, process, timeout: float, log) -> None:
    """Poll `url`/health until it answers 200; fail with `log()` (the server's output) if `process` exits first, or
    when `timeout` seconds pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, log()
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not come up in {timeout} s"
        time.sleep(0.5)


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 at a free port, in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    @staticmethod
    def free_port() -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
