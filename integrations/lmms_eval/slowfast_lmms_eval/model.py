"""`--model slowfast_adapter`: a Hugging Face video MLLM, with or without a slow-fast adapter, for lmms-eval.

Model arguments (`--model_args key=value,...`):
- pretrained: the base model (Hub id or local folder), loaded with AutoModelForImageTextToText + AutoProcessor
  (LLaVA-OneVision / LLaVA-Video HF checkpoints, Qwen2-VL, Qwen2.5-VL, Qwen3-VL).
- adapter: a slow-fast adapter folder or Hub id; `none` (default) runs the base at its native video tokens.
- slow_path: `on` (default) or `off`: fast tokens only, no cross-attention (`model.slow_path_disabled()`), the
  self-attention-only baseline at the same frame count. With `adapter=none`, `off` wraps the base with a fresh
  `SlowFastConfig` made of the pooling arguments below.
- num_frames (uniform over the video; default 64), or fps with max_frames (default 64): frames are read with
  slowfast_adapter's reader; fps counts round down to a multiple of the fast-token strides x the processor's
  temporal patch, as in training.
- min_pixels, max_pixels: the video processor's size bounds (`size["shortest_edge"/"longest_edge"]`, Qwen families).
- temporal_sampling_stride, temporal_pooling_stride, spatial_pooling_stride, min_fast_frames: the fast-token
  pooling (default: the adapter's own). They change no weights, e.g. 128 frames at sampling stride 2.
- cache_bytes: bytes of encoded videos the engine keeps between batches (default 1 GiB; 0: none).
- device (default: cuda when available, else cpu; one process per GPU under `accelerate launch`), dtype
  (auto, bfloat16, float16, float32), attn_implementation (sdpa, eager, flash_attention_2), system_prompt
  (default none: the chat template's own), video_backend (auto, decord, pyav).
The batch size is lmms-eval's own flag `--batch_size N` (left-padded batched generation). A document's visuals are
video paths or PIL images; several PIL images of one document are taken as the frames of one video (as MVBench's
frame-folder subtasks hand them over).

Requests run on the library's inference engine (`slowfast_adapter.inference.engine.Engine`, as the server and the
Gradio app do): the plugin reads the frames, the engine builds the prompts and the processor's batches, keeps each
video's encoding in its encode cache (an LRU bounded in bytes, keyed by the video's path), and generates (stop strings
= `until`; greedy, or sampling with `temperature` / `top_p`). `num_beams` > 1 runs the engine's beam search, one
request at a time. `adapter=none` serves the untouched base through the engine's `base` mode (the base wrapped with
a default `SlowFastConfig` whose branch it never runs).

Request types: generate_until, generate_until_multi_round, and loglikelihood for multiple-choice tasks ((loss,
is_greedy) per choice, lower is likelier, as lmms-eval's own models return; see `continuation_losses`). Several
processes: `accelerate launch --num_processes N -m lmms_eval ...` (one per GPU; on the CPU add `--multi_gpu` and
ACCELERATE_USE_CPU=true, since `--cpu` alone runs one process).
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
from lmms_eval.api.model import lmms
from PIL import Image
from slowfast_adapter import SlowFastConfig, SlowFastModel, wrap
from slowfast_adapter.inference.chat import SamplingParams
from slowfast_adapter.inference.engine import BASE, FAST_ONLY, ChatJob, Engine, EngineSettings, frames_digest
from slowfast_adapter.inference.video import VideoClip, read_clip, uniform_indices
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

# lmms-eval 0.7.3's evaluator passes every response through `api/instance.py::unwrap_generation_output`, which
# turns a plain `(loss, is_greedy)` tuple into its string, so `api/task.py::process_results` cannot unpack it (and the
# CLI exits 0 with no results). A `GenerationResult` comes out of it unchanged (`.text` as is): loglikelihood wraps
# its pairs in one where the installed lmms-eval mangles tuples, and returns plain tuples where it does not.
_MANGLES_TUPLES = unwrap_generation_output((0.0, False))[0] != (0.0, False)

POOLING = ("temporal_sampling_stride", "temporal_pooling_stride", "spatial_pooling_stride", "min_fast_frames")
MAX_STOP = 4  # stop strings the engine follows while generating; more are cut from the finished text


def _switch(value: Any, name: str) -> bool:
    if value in (True, "on", "true", "True", 1):
        return True
    if value in (False, "off", "false", "False", 0):
        return False
    raise ValueError(f"{name} must be on or off, got {value!r}.")


def _sampling(gen_kwargs: dict) -> tuple[SamplingParams, tuple[str, ...], int]:
    """(the engine's sampling, every stop string, beams) of lmms-eval's generation arguments."""
    until = gen_kwargs.get("until") or []
    stop = tuple(s for s in ([until] if isinstance(until, str) else until) if s)
    temperature = float(gen_kwargs.get("temperature") or 0)
    top_p = gen_kwargs.get("top_p")
    sampling = SamplingParams(
        max_tokens=int(gen_kwargs.get("max_new_tokens", 128)),
        temperature=temperature,
        top_p=float(top_p) if temperature > 0 and top_p is not None else 1.0,
        stop=stop if len(stop) <= MAX_STOP else (),
    )
    return sampling, stop, int(gen_kwargs.get("num_beams") or 1)


class SlowFastLMM(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        adapter: str | None = "none",
        slow_path: str = "on",
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        temporal_sampling_stride: int | None = None,
        temporal_pooling_stride: int | None = None,
        spatial_pooling_stride: int | None = None,
        min_fast_frames: int | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # passed by lmms-eval; only fixed batch sizes are supported
        cache_bytes: int | str = 2**30,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        system_prompt: str | None = None,
        video_backend: str = "auto",
    ) -> None:
        super().__init__()
        if not str(batch_size).isdigit():
            raise ValueError(f"batch_size must be a number (--batch_size N), got {batch_size!r}.")
        self.batch_size = int(batch_size)
        self.accelerator = accelerator = Accelerator()  # lmms-eval's evaluator syncs the ranks through it
        if accelerator.num_processes > 1:  # lmms-eval shards the documents by rank
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
            self.device = accelerator.device
        else:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        load = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
        if attn_implementation:
            load["attn_implementation"] = attn_implementation
        base = AutoModelForImageTextToText.from_pretrained(pretrained, **load).to(self.device).eval()
        self.processor = processor = AutoProcessor.from_pretrained(pretrained)

        adapter = None if adapter in (None, "", "none", "None") else str(adapter)
        self.slow_path = _switch(slow_path, "slow_path")
        strides = (temporal_sampling_stride, temporal_pooling_stride, spatial_pooling_stride, min_fast_frames)
        pooling = {name: value for name, value in zip(POOLING, strides, strict=True) if value is not None}
        if adapter is not None:
            model = SlowFastModel.from_pretrained(base, adapter)
            if pooling:  # the active adapter's config sets each call's pooling
                model.slowfast_configs[model.active_adapter] = dataclasses.replace(model.slowfast_config, **pooling)
        elif not self.slow_path:
            model = wrap(base, SlowFastConfig(**pooling))
        elif pooling:
            raise ValueError(f"{sorted(pooling)} need an adapter or slow_path=off: the base runs its native tokens.")
        else:  # the engine serves a SlowFastModel: its `base` mode runs the untouched base at its native tokens
            model = wrap(base, SlowFastConfig())
        self.model_id = BASE if adapter is None and self.slow_path else model.active_adapter
        self.model_id += "" if self.slow_path else FAST_ONLY
        self.model = model.eval()
        settings = EngineSettings(cache_bytes=int(cache_bytes), max_batch_size=max(1, self.batch_size),
                                  expose_baselines=True)  # fmt: skip
        self.engine = Engine(model, processor, settings=settings)

        video_processor = getattr(processor, "video_processor", None)
        patch = getattr(video_processor, "temporal_patch_size", None) or 1
        config = model.slowfast_config if self.model_id != BASE else None
        multiple = patch * (config.temporal_sampling_stride * config.temporal_pooling_stride if config else 1)
        if num_frames is None and fps is None:
            num_frames = 64
        self.sampling = {"num_frames": num_frames, "fps": fps, "multiple": multiple if fps else 1,
                         "max_frames": (max_frames or 64) if fps else None, "backend": video_backend}  # fmt: skip
        if min_pixels is not None or max_pixels is not None:  # the processor's own default size for every call
            size = getattr(video_processor, "size", None)
            if getattr(size, "longest_edge", None) is None:
                raise ValueError(f"min_pixels/max_pixels need a Qwen-style video processor, not {video_processor}.")
            video_processor.size = type(size)(
                shortest_edge=min_pixels or size.shortest_edge, longest_edge=max_pixels or size.longest_edge
            )
        self.system_prompt = system_prompt

    # ------------------------------------------------------------------------------------------- inputs
    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if visuals is None:
            return []
        visuals = visuals if isinstance(visuals, list | tuple) else [visuals]
        return [v for item in visuals for v in (item if isinstance(item, list | tuple) else [item])]

    def _clip(self, path: str, cache: dict[str, VideoClip]) -> VideoClip:
        if path not in cache:
            cache[path] = read_clip(path, **self.sampling)
        return cache[path]

    def _frames_clip(self, images: list[Image.Image]) -> VideoClip:
        """Several still frames of one document (e.g. MVBench's frame folders) as one video at 1 frame per second."""
        count, step = self.sampling["num_frames"], self.sampling["multiple"]
        if count is None:  # fps sampling: at most max_frames, a multiple of the strides, as for video files
            count = max(step, min(len(images), self.sampling["max_frames"]) // step * step)
        keep = uniform_indices(len(images), count)
        frames = np.stack([np.asarray(images[i].convert("RGB")) for i in keep])
        return VideoClip(frames, keep, 1.0, len(images), "frames")

    def _conversation(self, question: str, visuals: list, cache: dict[str, VideoClip]) -> dict[str, Any]:
        """`prepare_read`'s arguments for one question: the chat-template conversation, its videos' frames (read
        once per batch, or taken from the engine's encode cache), its images, and each video's key (its path)."""
        if len(visuals) > 1 and all(isinstance(v, Image.Image) for v in visuals):
            visuals = [self._frames_clip(visuals)]  # the frames of one video, as video benchmarks hand them over
        content, videos, images = [], [], []
        for visual in visuals:
            if isinstance(visual, str | VideoClip):
                videos.append(visual)
                content.append({"type": "video"})
            elif isinstance(visual, Image.Image):
                images.append(visual.convert("RGB"))
                content.append({"type": "image"})
            else:
                raise TypeError(f"Unsupported visual {type(visual).__name__}: give video paths or PIL images.")
        keys = [v if isinstance(v, str) else frames_digest(v) for v in videos]
        clips = self.engine.cached_clips(self.model_id, keys) if videos else None
        if clips is None:
            clips = [self._clip(v, cache) if isinstance(v, str) else v for v in videos]
        question = question.replace("<image>", "").replace("<video>", "").strip()
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return {"conversation": messages, "clips": clips, "images": images, "video_keys": keys}

    def _generate(self, rows: list[tuple[str, list]], gen_kwargs: dict, cache: dict[str, VideoClip]) -> list[str]:
        """The answers to (question, visuals) rows with the same generation arguments: the engine batches them
        (LLaVA-style processors: rows with the same frame counts) and stops each at `until`."""
        sampling, stop, beams = _sampling(gen_kwargs)
        jobs = []
        for question, visuals in rows:
            read = self._conversation(question, visuals, cache)
            jobs.append(self.engine.prepare_read(ChatJob(self.model_id, [], sampling=sampling), **read))
        if beams > 1:
            self.engine.run_beam_search(jobs, beams)
        else:
            self.engine.run_batch(jobs)
        answers = []
        for job in jobs:
            if job.error is not None:
                raise job.error
            text = job.result.text
            for s in stop:  # more stop strings than the engine follows: cut here (the others are cut already)
                text = text.split(s)[0]
            answers.append(text.strip())
        return answers

    # ------------------------------------------------------------------------------------------- lmms-eval API
    def generate_until(self, requests) -> list[str]:
        """Batches of `--batch_size` requests with the same generation arguments, ordered by video so that the
        questions about one video share a batch; each video is decoded once per batch and encoded once while the
        engine's encode cache keeps it."""
        rows, keys = [], []
        for question, gen_kwargs, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            rows.append((question, visuals, gen_kwargs))
            keys.append((json.dumps(gen_kwargs, sort_keys=True, default=str), [str(v) for v in visuals]))
        groups = defaultdict(list)  # generation arguments -> request indices, ordered by video
        for i in sorted(range(len(rows)), key=lambda i: keys[i]):
            groups[keys[i][0]].append(i)
        size = self.batch_size
        batches = [group[j : j + size] for group in groups.values() for j in range(0, len(group), size)]
        answers = [""] * len(rows)
        with tqdm(total=len(rows), disable=self.rank != 0, desc="slowfast_adapter") as bar:
            for batch in batches:
                texts = self._generate([rows[i][:2] for i in batch], dict(rows[batch[0]][2]), cache={})
                for i, text in zip(batch, texts, strict=True):
                    answers[i] = text
                bar.update(len(batch))
        return answers

    def loglikelihood(self, requests) -> list:
        """lmms-eval's scores of `requests` (context, continuation, ...): `continuation_losses`, each pair wrapped so
        that it reaches the task's scorer intact (see `_MANGLES_TUPLES`)."""
        losses = self.continuation_losses(requests)
        return [GenerationResult(text=pair) for pair in losses] if _MANGLES_TUPLES else losses

    def continuation_losses(self, requests) -> list[tuple[float, bool]]:
        """(loss, is_greedy) of each request's continuation after its chat prompt, as lmms-eval's own models return
        (`llava`, `llava_onevision`, `llava_vid`: the model's `loss` with the prompt's labels masked): loss is the mean
        negative log-probability of the continuation's tokens, so lower is likelier and lmms-eval's multiple-choice
        scorers (`api/task.py::process_results` and the video tasks' own, e.g. EgoSchema's and PerceptionTest's
        `mcppl`) take the argmin; is_greedy: whether greedy decoding gives exactly the continuation. One request per
        forward (`Engine.continuation_loss`); a video is decoded and encoded once for all of its continuations."""
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        args = [r.args for r in requests]
        visuals = [self._visuals(*a[2:]) for a in args]
        cache, last = {}, None
        for i in sorted(range(len(args)), key=lambda i: [str(v) for v in visuals[i]]):
            question, continuation, _, doc_id, task, split = args[i]
            if callable(continuation):
                continuation = continuation(self.task_dict[task][split][doc_id])
            if visuals[i] != last:
                cache, last = {}, visuals[i]
            read = self._conversation(question, visuals[i], cache)
            results[i] = self.engine.continuation_loss(self.model_id, continuation=continuation, **read)
        return results

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        """One request at a time: the task's `doc_to_text` gives each next round's visuals and question."""
        results = []
        for question, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split in (r.args for r in requests):
            doc = self.task_dict[task][split][doc_id]
            visuals, answers, info, round_idx = self._visuals(doc_to_visual, doc_id, task, split), [], None, 0
            while True:
                answers.append(self._generate([(question, visuals)], dict(gen_kwargs), cache={})[0])
                round_idx += 1
                visuals, question, done, answers, info = doc_to_text(
                    doc, previous_output=answers, round_idx=round_idx, previous_round_info=info
                )
                if done:
                    break
                visuals = [] if visuals is None else list(visuals)
            results.append(list(answers))
        return results
