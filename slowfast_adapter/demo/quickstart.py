"""The end-to-end quickstart: tiny offline base -> mp4 videos -> wrap -> train -> save -> reload -> generate.

Runs in well under a minute on a laptop CPU and touches every public piece: the stock processor, a real
`from_pretrained` base, decord/PyAV reading, adapter training, `save_pretrained` and the one-call load.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import SlowFastConfig
from ..inference.video import read_video
from ..model import SlowFastModel, wrap
from ..tools.tiny import save_tiny_llava_onevision, write_mp4
from ..training.accelerator import make_accelerator
from ..training.recipe import TrainArgs
from ..training.trainer import Trainer, one_group
from .needle_data import COLORS as NEEDLE_COLORS
from .needle_data import QUESTION

COLORS = {name: NEEDLE_COLORS[name] for name in ("red", "blue")}  # two videos, one per colour


@dataclass
class QuickstartConfig:
    """Defaults of the quickstart job (also in recipes/quickstart.yaml)."""

    output_dir: str = "quickstart-output"
    num_frames: int = 16
    frame_size: int = 32
    steps: int = 150
    learning_rate: float = 1e-2
    seed: int = 0
    slowfast: dict[str, Any] | None = None

    def slowfast_config(self) -> SlowFastConfig:
        defaults = {"min_fast_frames": 4, "hybrid_layer_interval": 2}
        return SlowFastConfig(**{**defaults, **(self.slowfast or {})})


def square_video(color: tuple[int, int, int], *, num_frames: int, size: int, seed: int) -> np.ndarray:
    """A `color` square moving left to right over grey noise: uint8 [T, size, size, 3]."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(90, 150, size=(num_frames, size, size, 3), dtype=np.uint8)
    side = size // 4
    for t in range(num_frames):
        x = (t * (size - side)) // max(1, num_frames - 1)
        frames[t, size // 2 - side // 2 : size // 2 + side // 2, x : x + side] = color
    return frames


def answer_batch(processor, prompt: str, answers: list[str], videos: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """`prompt` + each answer + `<|im_end|>` with its video, labels on the answer tokens only (right padding).

    Every video must have the same frame count and size, so the prompt has the same length in every row.
    """
    processor.tokenizer.padding_side = "right"
    texts = [f"{prompt}{answer}<|im_end|>" for answer in answers]
    batch = processor(text=texts, videos=videos, return_tensors="pt", padding=True)
    prompt_len = processor(text=[prompt], videos=videos[:1], return_tensors="pt")["input_ids"].shape[1]
    labels = batch["input_ids"].clone()
    labels[:, :prompt_len] = -100
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return batch


def _training_batch(processor, videos: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """'It is <colour>.' for each video."""
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return answer_batch(processor, prompt, [f"It is {color}." for color in videos], list(videos.values()))


def readable(text: str, token_ids: list[int]) -> str:
    """The answer for a log line: quoted text when printable, else the token ids (a tiny random base often
    produces byte tokens that do not decode to readable text)."""
    if text.isprintable() and "\ufffd" not in text:  # U+FFFD: bytes that did not decode
        return repr(text)
    return f"token ids {token_ids} (not printable text)"


def run(config: QuickstartConfig | None = None, log=print) -> dict[str, Any]:
    """Run the quickstart; returns (and writes to `output_dir/summary.json`) what happened."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    config = config or QuickstartConfig()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    start = time.perf_counter()

    base_dir = save_tiny_llava_onevision(out / "base", image_size=config.frame_size, seed=config.seed)
    log(f"[1/6] tiny LLaVA-OneVision base saved to {base_dir}")
    (out / "videos").mkdir(exist_ok=True)
    paths = {}
    for i, (name, rgb) in enumerate(COLORS.items()):
        clip = square_video(rgb, num_frames=2 * config.num_frames, size=config.frame_size, seed=config.seed + i)
        paths[name] = write_mp4(out / "videos" / f"{name}.mp4", clip)
    videos = {name: read_video(path, config.num_frames) for name, path in paths.items()}
    log(f"[2/6] wrote {len(paths)} mp4 videos, read back {config.num_frames} frames each")

    base = AutoModelForImageTextToText.from_pretrained(base_dir)
    processor = AutoProcessor.from_pretrained(base_dir)
    model = wrap(base, config.slowfast_config())
    trainable, total = model.get_nb_trainable_parameters()
    log(f"[3/6] wrapped: hybrid layers {model.hybrid_layer_indices}, {trainable:,d} of {total:,d} parameters train")

    batch = _training_batch(processor, videos)  # one fixed batch, trained on at a constant learning rate
    args = TrainArgs(
        max_steps=config.steps,
        per_device_batch_size=len(videos),
        seed=config.seed,
        lr_scheduler="constant",
        warmup_steps=0,
        max_grad_norm=None,
        mixed_precision="no",
        logging_steps=25,
    )
    trainer = Trainer(
        model,
        args,
        lambda epoch, skip: itertools.repeat(batch),
        accelerator=make_accelerator(args, cpu=True),
        groups=one_group(model, config.learning_rate),
        name="[4/6] train",
        log=log,
    )
    losses = [round(loss, 4) for loss in trainer.fit()["losses"]]

    adapter_dir = out / "adapter"
    model.save_pretrained(adapter_dir)
    size_kb = (adapter_dir / "adapter_model.safetensors").stat().st_size / 1024
    log(f"[5/6] adapter saved to {adapter_dir} ({size_kb:.1f} KiB)")

    fresh = AutoModelForImageTextToText.from_pretrained(base_dir)
    reloaded = SlowFastModel.from_pretrained(fresh, adapter_dir).eval()
    processor.tokenizer.padding_side = "left"
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    answers, fast_only_answers, shown = {}, {}, {}
    for name, clip in videos.items():
        inputs = processor(text=[prompt], videos=[clip], return_tensors="pt")
        for target, disabled in ((answers, False), (fast_only_answers, True)):
            with reloaded.slow_path_disabled() if disabled else contextlib.nullcontext():  # fast-only: for contrast
                output = reloaded.generate(**inputs, max_new_tokens=8, do_sample=False)
            new_ids = output[0, inputs["input_ids"].shape[1] :]
            target[name] = processor.decode(new_ids, skip_special_tokens=True)
            shown[name, disabled] = readable(target[name], new_ids.tolist())
        log(f"[6/6] {name} video, {QUESTION!r} -> {shown[name, False]} (slow path off: {shown[name, True]})")

    summary = {
        "config": asdict(config),
        "hybrid_layers": model.hybrid_layer_indices,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "losses": losses,
        "adapter_kib": round(size_kb, 1),
        "answers": answers,
        "answers_slow_path_disabled": fast_only_answers,
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done in {summary['seconds']} s; summary in {out / 'summary.json'}")
    return summary
