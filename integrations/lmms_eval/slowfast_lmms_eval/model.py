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
- device (default: cuda when available, else cpu; one process per GPU under `accelerate launch`), dtype
  (auto, bfloat16, float16, float32), attn_implementation (sdpa, eager, flash_attention_2), system_prompt
  (default none: the chat template's own), video_backend (auto, decord, pyav).
The batch size is lmms-eval's own flag `--batch_size N` (left-padded batched generation). A document's visuals are
video paths or PIL images; several PIL images of one document are taken as the frames of one video (as MVBench's
frame-folder subtasks hand them over).

Request types: generate_until, generate_until_multi_round, and loglikelihood for multiple-choice tasks ((loss,
is_greedy) per choice, lower is likelier, as lmms-eval's own models return; see `continuation_losses`). Several
processes: `accelerate launch --num_processes N -m lmms_eval ...` (one per GPU; on the CPU add `--multi_gpu` and
ACCELERATE_USE_CPU=true, since `--cpu` alone runs one process).
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
from lmms_eval.api.model import lmms
from PIL import Image
from slowfast_adapter import EncodedVideos, SlowFastConfig, SlowFastModel, wrap
from slowfast_adapter.inference.video import VideoClip, read_clip, uniform_indices
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

# lmms-eval 0.7.3's evaluator passes every response through `api/instance.py::unwrap_generation_output`, which
# turns a plain `(loss, is_greedy)` tuple into its string, so `api/task.py::process_results` cannot unpack it (and the
# CLI exits 0 with no results). A `GenerationResult` comes out of it unchanged (`.text` as is): loglikelihood wraps
# its pairs in one where the installed lmms-eval mangles tuples, and returns plain tuples where it does not.
_MANGLES_TUPLES = unwrap_generation_output((0.0, False))[0] != (0.0, False)

POOLING = ("temporal_sampling_stride", "temporal_pooling_stride", "spatial_pooling_stride", "min_fast_frames")


def _switch(value: Any, name: str) -> bool:
    if value in (True, "on", "true", "True", 1):
        return True
    if value in (False, "off", "false", "False", 0):
        return False
    raise ValueError(f"{name} must be on or off, got {value!r}.")


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
        self.processor = AutoProcessor.from_pretrained(pretrained)

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
        else:
            model = base
        self.model = model.eval()
        self._mode = nullcontext if self.slow_path else model.slow_path_disabled
        self._encoded: tuple[list[str], EncodedVideos | None] = ([], None)  # the last batch's videos, encoded

        video_processor = getattr(self.processor, "video_processor", None)
        patch = getattr(video_processor, "temporal_patch_size", None) or 1
        config = getattr(model, "slowfast_config", None)
        multiple = patch * (config.temporal_sampling_stride * config.temporal_pooling_stride if config else 1)
        if num_frames is None and fps is None:
            num_frames = 64
        self.sampling = {"num_frames": num_frames, "fps": fps, "multiple": multiple if fps else 1,
                         "max_frames": (max_frames or 64) if fps else None, "backend": video_backend}  # fmt: skip
        self.video_kwargs: dict[str, Any] = {}
        if min_pixels is not None or max_pixels is not None:
            size = getattr(video_processor, "size", None)
            if getattr(size, "longest_edge", None) is None:
                raise ValueError(f"min_pixels/max_pixels need a Qwen-style video processor, not {video_processor}.")
            bounds = {
                "shortest_edge": min_pixels or size.shortest_edge,
                "longest_edge": max_pixels or size.longest_edge,
            }
            self.video_kwargs["videos_kwargs"] = {"size": bounds}
        # LLaVA-style processors stack a batch's videos in one tensor: one frame count per sub-batch
        self.stacks_videos = "video_grid_thw" not in getattr(video_processor, "model_input_names", [])
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

    def _prompt(self, question: str, visuals: list, cache: dict[str, VideoClip], media: dict[str, list]) -> str:
        """The chat-template prompt for one question; its videos' frames and images are appended to `media`."""
        if len(visuals) > 1 and all(isinstance(v, Image.Image) for v in visuals):
            visuals = [self._frames_clip(visuals)]  # the frames of one video, as video benchmarks hand them over
        content = []
        for visual in visuals:
            if isinstance(visual, str | VideoClip):
                clip = visual if isinstance(visual, VideoClip) else self._clip(visual, cache)
                media["videos"].append(clip.frames)
                media["video_metadata"].append(clip.metadata())
                content.append({"type": "video"})
            elif isinstance(visual, Image.Image):
                media["images"].append(visual.convert("RGB"))
                content.append({"type": "image"})
            else:
                raise TypeError(f"Unsupported visual {type(visual).__name__}: give video paths or PIL images.")
        question = question.replace("<image>", "").replace("<video>", "").strip()
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def _inputs(self, texts: list[str], media: dict[str, list]) -> dict:
        """The stock processor's left-padded batch."""
        kwargs: dict[str, Any] = {"images": media["images"]} if media["images"] else {}
        if media["videos"]:
            kwargs.update(videos=media["videos"], video_metadata=media["video_metadata"], do_sample_frames=False)
            kwargs.update(self.video_kwargs)
        inputs = self.processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs)
        inputs.pop("token_type_ids", None)
        return inputs.to(self.device)

    @staticmethod
    def _media() -> dict[str, list]:
        return {"videos": [], "video_metadata": [], "images": []}

    def _sub_batches(self, rows: list[tuple[str, list]], cache: dict[str, VideoClip]) -> list[list[int]]:
        if not self.stacks_videos:
            return [list(range(len(rows)))]
        groups = defaultdict(list)  # frame counts -> rows (a document's still frames: how many there are)
        for i, (_, visuals) in enumerate(rows):
            counts = [len(self._clip(v, cache).frames) if isinstance(v, str) else -len(visuals) for v in visuals]
            groups[tuple(counts)].append(i)
        return list(groups.values())

    @torch.no_grad()
    def _generate(self, rows: list[tuple[str, list]], gen_kwargs: dict, cache: dict[str, VideoClip]) -> list[str]:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = float(gen_kwargs.get("temperature") or 0) > 0
        generate = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", 128)), "do_sample": sample,
                    "num_beams": int(gen_kwargs.get("num_beams") or 1)}  # fmt: skip
        if sample:
            generate["temperature"] = float(gen_kwargs["temperature"])
            if gen_kwargs.get("top_p") is not None:
                generate["top_p"] = float(gen_kwargs["top_p"])
        answers = [""] * len(rows)
        for group in self._sub_batches(rows, cache):
            media = self._media()
            inputs = self._inputs([self._prompt(*rows[i], cache, media) for i in group], media)
            paths = sorted({str(visual) for i in group for visual in rows[i][1]})
            with self._mode():
                if self._encoded[0] != paths:  # requests come sorted by video: keep the last batch's videos
                    self._encoded = (paths, self._encode(inputs))
                encoded = self._encoded[1]
                reuse = {"encoded": encoded} if encoded is not None else {}
                output = self.model.generate(**inputs, **generate, **reuse)
            texts = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(group, texts, strict=True):
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                answers[i] = text.strip()
        return answers

    def _encode(self, inputs: dict, *, prompt: bool = True) -> EncodedVideos | None:
        """The batch's videos encoded once (vision tower, slow K/V, and for a one-question batch the prompt's KV
        cache up to the video) for every question about them; None for the base model (`adapter=none`), which
        encodes its own native tokens. prompt=False: the videos only."""
        if not isinstance(self.model, SlowFastModel) or inputs.get("pixel_values_videos") is None:
            return None
        if not prompt:
            inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        return self.model.encode(**inputs)

    # ------------------------------------------------------------------------------------------- lmms-eval API
    def generate_until(self, requests) -> list[str]:
        """Batches of `--batch_size` requests with the same generation arguments, ordered by video so that the
        questions about one video share a batch; each video is decoded once per batch."""
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

    @torch.no_grad()
    def continuation_losses(self, requests) -> list[tuple[float, bool]]:
        """(loss, is_greedy) of each request's continuation after its chat prompt, as lmms-eval's own models return
        (`llava`, `llava_onevision`, `llava_vid`: the model's `loss` with the prompt's labels masked): loss is the mean
        negative log-probability of the continuation's tokens, so lower is likelier and lmms-eval's multiple-choice
        scorers (`api/task.py::process_results` and the video tasks' own, e.g. EgoSchema's and PerceptionTest's
        `mcppl`) take the argmin; is_greedy: whether greedy decoding gives exactly the continuation. One request per
        forward; a video is decoded and encoded once for all of its continuations."""
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        args = [r.args for r in requests]
        visuals = [self._visuals(*a[2:]) for a in args]
        cache, last, encoded = {}, None, None
        for i in sorted(range(len(args)), key=lambda i: [str(v) for v in visuals[i]]):
            question, continuation, _, doc_id, task, split = args[i]
            if callable(continuation):
                continuation = continuation(self.task_dict[task][split][doc_id])
            if visuals[i] != last:
                cache, last, encoded = {}, visuals[i], None
            media = self._media()
            prompt = self._prompt(question, visuals[i], cache, media)
            inputs = self._inputs([prompt + continuation], media)
            tokens = self.processor.tokenizer
            count = len(tokens(prompt + continuation)["input_ids"]) - len(tokens(prompt)["input_ids"])
            if count < 1:
                raise ValueError(f"Empty continuation for request {i}: {continuation!r}.")
            encoded = encoded or self._encode(inputs, prompt=False)  # the video's other continuations reuse it
            with self._mode():
                reuse = {"encoded": encoded} if encoded is not None else {}
                logits = self.model(**inputs, **reuse).logits[0, -count - 1 : -1].float()  # fitted sequence: same tail
            target = inputs["input_ids"][0, -count:]
            logprobs = torch.log_softmax(logits, dim=-1)
            results[i] = (
                -float(logprobs.gather(-1, target[:, None]).mean()),
                bool((logprobs.argmax(-1) == target).all()),
            )
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
