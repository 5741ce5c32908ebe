"""Shared fixtures: every supported family's tiny model, saved once, loaded back with the real from_pretrained.

Tests that take the `base`, `processor` or `tiny_dir` fixture run once per family.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from slowfast_adapter.tools.tiny import TINY_BUILDERS, random_video, save_tiny  # noqa: E402

torch.set_num_threads(2)
FAMILIES = list(TINY_BUILDERS)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> folder with the saved tiny model and processor (built on first use)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = save_tiny(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tiny_dir(tiny_dirs, family):
    return tiny_dirs(family)


@pytest.fixture
def base(tiny_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()


@pytest.fixture
def processor(tiny_dir):
    return AutoProcessor.from_pretrained(tiny_dir)


def conversation(*parts: str) -> list[dict]:
    """A one-turn user conversation; parts are 'video', 'image' or text."""
    content = [{"type": p} if p in ("video", "image") else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def make_inputs(
    processor,
    samples: list[tuple[str, ...]],
    *,
    frames: int = 8,
    padding_side: str = "left",
    seed: int = 0,
    video_seeds: list[int] | None = None,
):
    """Processor output for samples like ('video', 'What is it?').

    Video i (in reading order) is a random clip with seed `video_seeds[i]` (default `seed + i`).
    """
    processor.tokenizer.padding_side = padding_side
    texts = [processor.apply_chat_template(conversation(*s), add_generation_prompt=True) for s in samples]
    num_videos = sum(s.count("video") for s in samples)
    num_images = sum(s.count("image") for s in samples)
    video_seeds = video_seeds or [seed + i for i in range(num_videos)]
    kwargs = {}
    if num_videos:
        kwargs["videos"] = [random_video(frames, seed=s) for s in video_seeds]
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


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change once set: start a test that makes
    its own Accelerator from none, and leave none behind."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
