"""Shared fixtures: a tiny LLaVA-OneVision saved to disk once, loaded back with the real from_pretrained."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration  # noqa: E402

from slowfast_adapter.tiny import random_video, save_tiny_llava_onevision  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny_llava_onevision(tmp_path_factory.mktemp("tiny-llava-ov"))


@pytest.fixture
def base(tiny_dir):
    return LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_dir).eval()


@pytest.fixture
def processor(tiny_dir):
    return AutoProcessor.from_pretrained(tiny_dir)


def conversation(*parts: str) -> list[dict]:
    """A one-turn user conversation; parts are 'video', 'image' or text."""
    content = [{"type": p} if p in ("video", "image") else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def make_inputs(
    processor, samples: list[tuple[str, ...]], *, frames: int = 8, padding_side: str = "left", seed: int = 0
):
    """Processor output for samples like ('video', 'What is it?'); each video is a distinct random clip."""
    processor.tokenizer.padding_side = padding_side
    texts = [processor.apply_chat_template(conversation(*s), add_generation_prompt=True) for s in samples]
    num_videos = sum(s.count("video") for s in samples)
    num_images = sum(s.count("image") for s in samples)
    kwargs = {}
    if num_videos:
        kwargs["videos"] = [random_video(frames, seed=seed + i) for i in range(num_videos)]
    if num_images:
        kwargs["images"] = [random_video(1, size=40, seed=100 + seed + i)[0] for i in range(num_images)]
    return processor(text=texts, return_tensors="pt", padding=True, **kwargs)


def open_gates(model, value: float = 1.5, seed: int = 0) -> None:
    """Give every hybrid layer a clearly non-zero gate so the slow path changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in model.slow_branches.values():
            branch.attn_gate.fill_(value)
            if branch.gate_proj is not None:
                branch.gate_proj.weight.copy_(torch.randn(branch.gate_proj.weight.shape, generator=generator))
                branch.gate_proj.bias.fill_(1.0)
