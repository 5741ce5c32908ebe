"""Shared helpers of the CPU benchmarks: the benchmark model, timers, peak memory, machine facts.

Peak memory is the process's peak resident set size during a call minus its resident size just before
(Linux: the peak is reset through /proc/self/clear_refs). For that to see every large tensor, glibc must
hand large blocks back to the OS when they are freed, so memory is measured in a separate process with
MALLOC_MMAP_THRESHOLD_ set (`run_worker(..., memory=True)`). That setting makes every large allocation
fault in fresh pages, which slows compute, so times are measured in processes with the default allocator.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

# The benchmark model: LLaVA-OneVision layout, Qwen2-style decoder. "default" is the largest that runs
# the benchmarks in minutes on 2 CPU cores; "quick" is for smoke runs.
MODELS: dict[str, dict[str, int]] = {
    "default": dict(hidden=768, layers=16, heads=12, kv_heads=2, intermediate=2048, vocab=32000),
    "quick": dict(hidden=256, layers=8, heads=4, kv_heads=2, intermediate=512, vocab=4096),
}
IMAGE_SIZE, PATCH_SIZE = 112, 4  # 28 x 28 patches per frame, 2x2-pooled to 14 x 14 = 196 video tokens per frame


def build_model(size: str, *, hybrid_layer_interval: int = 8, seed: int = 0):
    """(random LLaVA-OneVision model, its stock processor) of the given size, fp32, eval mode."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from slowfast_adapter.tools.tiny import build_tiny_llava_onevision

    shape = MODELS[size]
    tiny, processor = build_tiny_llava_onevision(num_layers=1, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    config = tiny.config
    text = config.text_config
    text.hidden_size, text.num_hidden_layers = shape["hidden"], shape["layers"]
    text.num_attention_heads, text.num_key_value_heads = shape["heads"], shape["kv_heads"]
    text.head_dim = shape["hidden"] // shape["heads"]
    text.intermediate_size, text.vocab_size = shape["intermediate"], shape["vocab"]
    text.layer_types = ["full_attention"] * shape["layers"]
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    return model, processor


def video_inputs(processor, frames: int, *, text: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor output for one random video of `frames` frames and a question of about 100 text tokens."""
    from slowfast_adapter.tools.tiny import random_video

    question = text or " ".join(["What is happening in this video? Describe the colours and the shapes."] * 6)
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    video = random_video(frames, size=IMAGE_SIZE, seed=seed)
    return dict(processor(text=[prompt], videos=[video], return_tensors="pt"))


def _status_mib(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def peak_memory_mib(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(peak resident memory during fn() above the resident memory before it, in MiB; fn's result)."""
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = _status_mib("VmRSS")
    result = fn()
    return _status_mib("VmHWM") - before, result


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times)}


def matmul_flops_per_second(n: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate (FLOP/s): best of `repeats` n x n @ n x n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / min(time_calls(lambda: a @ b, repeats=repeats))


def machine() -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15": list(os.getloadavg()),
    }


def run_worker(script: Path, setting: dict[str, Any], *, memory: bool = False) -> dict[str, Any]:
    """Run `script --worker SETTING` in a fresh process and return its JSON output.

    memory: run with MALLOC_ENV (for peak-memory measurements; not for timing).
    """
    env = {**os.environ, **MALLOC_ENV} if memory else {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    setting = {**setting, "measure": "memory" if memory else "time"}
    command = [sys.executable, str(script), "--worker", json.dumps(setting)]
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"worker failed: {' '.join(command)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_results(name: str, data: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)


def command_line() -> str:
    """The command that produced the results, as typed (run from the repository root)."""
    return "python " + " ".join(sys.argv)


class StepTimer:
    """A logits processor that stamps the time at every generated token: `generate` calls it once per model
    forward, right after it, so consecutive stamps are one decode step apart (forward, then the sampling and
    stopping checks of the step). On CUDA it synchronises first, so a stamp follows the step's kernels."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.is_cuda:
            torch.cuda.synchronize(scores.device)
        self.stamps.append(time.perf_counter())
        return scores

    def step_times(self) -> list[float]:
        """Seconds of each decode step (the prefill, before the first stamp, is not among them)."""
        return [b - a for a, b in itertools.pairwise(self.stamps)]


def timed_generate(
    model: Any, inputs: dict[str, Any], new_tokens: int, **kwargs: Any
) -> tuple[torch.Tensor, list[float]]:
    """Greedy `generate` of exactly `new_tokens` tokens: (sequences, seconds of each of its decode steps)."""
    from transformers import LogitsProcessorList

    timer = StepTimer()
    sequences = model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        logits_processor=LogitsProcessorList([timer]), **kwargs,
    )  # fmt: skip
    return sequences, timer.step_times()
