"""One inference engine for every front end (the OpenAI-compatible server, the Gradio app, the lmms-eval plugin).

    engine = Engine.load("path/to/base", {"default": "path/to/adapter"}, media_roots=["videos/"])
    answer = engine.chat([{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "clip.mp4"}}, {"type": "text", "text": "What happens?"}]}])

A request (`ChatJob`) is *prepared* in the caller's thread (media read within the operator's `MediaPolicy`, frames
sampled, chat template, the stock processor's one-row inputs) and then *run* by the engine's worker thread, which owns
the model: requests that can share a batch (same model, same decoding rule; for processors that stack videos, the
same frame counts) run as one left-padded `generate`. Each prompt's videos are encoded once (`SlowFastModel.encode`:
features, slow K/V and the prompt prefix's KV cache) and kept in an `EncodeCache` bounded in bytes, so a follow-up
question about a video already seen skips the vision tower and the prefix. Text reaches the caller token by token
through `ChatJob.on_text`; `ChatJob.cancelled` ends a request at the next step.

Model ids: one per adapter (its name); with `expose_baselines`, also `base` (the untouched base at its native video
tokens) and `<adapter>:fast-only` (fast tokens only, no cross-attention).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import StoppingCriteriaList

from ..core.encoded import EncodedVideos, fingerprint
from ..core.pooling import plan_fast_frames
from ..model import SlowFastModel
from .answers import AnswerRow, AnswerRows
from .chat import FrameSampling, MediaRef, SamplingParams, parse_messages
from .collate import collate
from .encode_cache import CachedVideos, EncodeCache
from .media import MediaPolicy, RequestError, load_media, public_message
from .video import VideoClip, VideoReadError, read_clip

FAST_ONLY = ":fast-only"
BASE = "base"


@dataclass(frozen=True)
class EngineSettings:
    """How the engine serves; every field has a default."""

    num_frames: int | None = field(
        default=None, metadata={"help": "Frames read per video (None: what each adapter's pooling is built for)."}
    )
    cache_bytes: int = field(default=4 * 2**30, metadata={"help": "Bytes of encoded videos kept (0: none)."})
    max_batch_size: int = field(default=8, metadata={"help": "Most requests run as one batch (1: one at a time)."})
    max_model_len: int | None = field(
        default=None, metadata={"help": "Longest prompt + answer in tokens (None: the LLM's max_position_embeddings)."}
    )
    default_max_tokens: int = field(default=256, metadata={"help": "max_tokens of requests that give none."})
    expose_baselines: bool = field(
        default=False, metadata={"help": "Also serve `base` and `<adapter>:fast-only` (for comparisons)."}
    )


@dataclass
class Completion:
    """One finished answer: its text, why it ended ('stop', 'length', 'cancelled') and the tokens it took.

    prompt_tokens counts the tokens the LLM read (fast tokens in place of the native video tokens)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cache_hit: bool = False


@dataclass
class ChatJob:
    """One chat request on its way through the engine. Callbacks run on the engine's worker thread."""

    model: str
    messages: list[dict]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    frames: FrameSampling = field(default_factory=FrameSampling)
    on_text: Callable[[str], None] | None = None
    on_done: Callable[[ChatJob], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    # filled by `Engine.prepare`
    adapter: str | None = None
    mode: str = "slowfast"
    prompt: str = ""
    clips: list[VideoClip] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    inputs: dict[str, Any] | None = None
    cache_key: tuple | None = None
    # filled by the worker
    result: Completion | None = None
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, result: Completion | None = None, error: Exception | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)


def frames_per_unit(model: torch.nn.Module) -> int:
    """Frames per temporal unit of the base's video tokens (Qwen families: 2 frames per temporal patch)."""
    base = model.base_model if isinstance(model, SlowFastModel) else model
    return int(getattr(base.config.vision_config, "temporal_patch_size", 1) or 1)


def default_frames(model: SlowFastModel, adapter: str | None = None) -> int:
    """The frame count an adapter's pooling is built for: `min_fast_frames` fast frames at its strides, times the
    base's frames per temporal unit (32 for the demo's adapter; 64 for the released s1/t4 configs)."""
    config = model.slowfast_configs[adapter or model.active_adapter]
    strides = config.temporal_sampling_stride * config.temporal_pooling_stride
    return config.min_fast_frames * strides * frames_per_unit(model)


class Engine:
    """A `SlowFastModel` (one base, one or more adapters), its processor, an encode cache and a worker thread."""

    def __init__(
        self,
        model: SlowFastModel,
        processor: Any,
        *,
        settings: EngineSettings | None = None,
        policy: MediaPolicy | None = None,
    ) -> None:
        if not isinstance(model, SlowFastModel):
            raise TypeError(f"Engine serves a SlowFastModel (wrap or load an adapter first), got {type(model)}.")
        self.model = model.eval()
        self.processor = processor
        self.settings = settings or EngineSettings()
        self.policy = policy or MediaPolicy()
        self.cache = EncodeCache(self.settings.cache_bytes)
        text_config = model.family.text_config(model.base_model)
        self.max_model_len = self.settings.max_model_len or int(text_config.max_position_embeddings)
        generation = model.generation_config
        eos = generation.eos_token_id if generation.eos_token_id is not None else processor.tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else eos)
        self.pad_id = generation.pad_token_id if generation.pad_token_id is not None else min(self.eos_ids)
        video_processor = getattr(processor, "video_processor", None)
        self.stacks_videos = "video_grid_thw" not in getattr(video_processor, "model_input_names", [])
        self.counters = {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0, "batches": 0}
        self._model_lock = threading.Lock()
        self._queue: list[ChatJob] = []
        self._wakeup = threading.Condition()
        self._worker: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def load(
        cls,
        base: str | Path,
        adapters: dict[str, str | Path],
        *,
        device: str | None = None,
        dtype: str = "auto",
        settings: EngineSettings | None = None,
        **policy: Any,
    ) -> Engine:
        """Load a saved base (model + processor folder or Hub id) and each adapter under its name; `policy`: the
        `MediaPolicy` fields (media_roots, allow_remote, max_bytes, max_frames)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not adapters:
            raise ValueError("Give at least one adapter (name -> folder).")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        base_model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch_dtype).to(device).eval()
        processor = AutoProcessor.from_pretrained(base)
        (first, path), *rest = adapters.items()
        model = SlowFastModel.from_pretrained(base_model, path, adapter_name=first)
        for name, path in rest:
            model.load_adapter(path, name)
        model.set_adapter(first)
        return cls(model, processor, settings=settings, policy=MediaPolicy(**policy))

    # ------------------------------------------------------------------------------------------- models
    @property
    def model_ids(self) -> list[str]:
        adapters = list(self.model.slowfast_adapters)
        if not self.settings.expose_baselines:
            return adapters
        return [*adapters, *(name + FAST_ONLY for name in adapters), BASE]

    def _resolve(self, model_id: str) -> tuple[str | None, str]:
        """(adapter, mode) of a model id; unknown ids get a 404 that lists the served ones."""
        if model_id not in self.model_ids:
            raise RequestError(f"The model {model_id!r} does not exist here; served: {self.model_ids}.", status=404,
                               code="model_not_found", param="model")  # fmt: skip
        if model_id == BASE:
            return None, "base"
        if model_id.endswith(FAST_ONLY):
            return model_id[: -len(FAST_ONLY)], "fast_only"
        return model_id, "slowfast"

    def _mode(self, mode: str):
        return {"base": self.model.disable_adapter, "fast_only": self.model.slow_path_disabled}.get(mode, nullcontext)

    # ------------------------------------------------------------------------------------------- preparing
    def _read_settings(self, adapter: str | None, frames: FrameSampling) -> dict[str, Any]:
        """`read_clip` arguments for a request's frame settings, checked against the limits and the strides."""
        adapter = adapter or self.model.active_adapter
        config = self.model.slowfast_configs[adapter]
        per_unit = frames_per_unit(self.model)
        limit = self.policy.max_frames
        if frames.fps is not None:
            if frames.fps <= 0:
                raise RequestError(f"fps must be > 0, got {frames.fps}.", param="mm_processor_kwargs")
            multiple = per_unit * config.temporal_sampling_stride * config.temporal_pooling_stride
            cap = min(frames.max_frames or limit, limit)
            return {"fps": frames.fps, "max_frames": cap, "multiple": multiple}
        count = frames.num_frames or self.settings.num_frames or default_frames(self.model, adapter)
        if not 1 <= count <= limit:
            raise RequestError(f"num_frames must be in [1, {limit}] (this server's limit), got {count}.",
                               param="mm_processor_kwargs")  # fmt: skip
        if count % per_unit:
            raise RequestError(f"num_frames must be a multiple of {per_unit} (the base's frames per temporal patch), "
                               f"got {count}.", param="mm_processor_kwargs")  # fmt: skip
        try:
            plan_fast_frames(count // per_unit, config)
        except ValueError as err:
            raise RequestError(str(err), param="mm_processor_kwargs") from err
        return {"num_frames": count}

    def prepare(self, job: ChatJob) -> ChatJob:
        """Read `job`'s media and build its prompt and one-row inputs (in the caller's thread); `RequestError`s name
        what is wrong with the request."""
        job.adapter, job.mode = self._resolve(job.model)
        conversation, refs = parse_messages(job.messages)
        reading = self._read_settings(job.adapter, job.frames)
        with ExitStack() as stack:
            media = [stack.enter_context(load_media(ref.url, ref.kind, self.policy, param=ref.param)) for ref in refs]
            videos = [(ref, item) for ref, item in zip(refs, media, strict=True) if ref.kind == "video"]
            if videos and job.mode != "base":
                digests = tuple(item.digest for _, item in videos)
                job.cache_key = (job.adapter, job.mode, tuple(sorted(reading.items())), digests)
                cached = self.cache.peek(job.cache_key)
            else:
                cached = None
            clips = cached.clips if cached else [self._clip(ref, item, reading) for ref, item in videos]
            images = [self._image(ref, item) for ref, item in zip(refs, media, strict=True) if ref.kind == "image"]
        return self._prepared(job, conversation, clips, images)

    def prepare_read(
        self,
        job: ChatJob,
        conversation: list[dict],
        *,
        clips: Sequence[VideoClip] = (),
        images: Sequence[Any] = (),
        video_keys: Sequence[str] | None = None,
    ) -> ChatJob:
        """Prepare `job` from a chat-template `conversation` (`{"type": "video"}` / `{"type": "image"}` parts) and
        the frames and PIL images it shows, already read in this process (the Gradio app, the lmms-eval plugin; no
        `MediaPolicy` applies). video_keys: each clip's identity for the encode cache (e.g. a digest of its file and
        sampling); default: a digest of its frames."""
        job.adapter, job.mode = self._resolve(job.model)
        job.cache_key = self._read_key(job, clips, video_keys)
        return self._prepared(job, conversation, list(clips), list(images))

    @staticmethod
    def _read_key(job: ChatJob, clips: Sequence[VideoClip], video_keys: Sequence[str] | None) -> tuple | None:
        """The encode-cache key of frames read in-process (`prepare_read`): `video_keys`, else the clips' digests;
        None without videos or in `base` mode."""
        if job.mode == "base" or not (video_keys or clips):
            return None
        return (job.adapter, job.mode, "read", tuple(video_keys or [frames_digest(clip) for clip in clips]))

    def _prepared(self, job: ChatJob, conversation: list[dict], clips: list[VideoClip], images: list) -> ChatJob:
        job.clips, job.images = clips, images
        job.prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        host = self.inputs([job], on_model=False)
        job.inputs = self._to_model(host)
        entry = self.cache.peek(job.cache_key) if job.cache_key is not None else None
        if entry is not None and entry.encoded is not None and host.get("pixel_values_videos") is not None:
            # hash the cached videos' pixels here, in the caller's thread and before they reach the model's device:
            # the entry's memo keeps the digests (for the device copies too), so the worker finds them instead of
            # stopping the model to hash (~60 ms per 64-frame 384-px video)
            family = self.model.family
            for (pixels, _), (moved, _) in zip(family.video_pixels(host), family.video_pixels(job.inputs), strict=True):
                entry.encoded.remember(moved, entry.encoded.fingerprint(pixels))
        return job

    def _clip(self, ref: MediaRef, media, reading: dict[str, Any]) -> VideoClip:
        try:
            return read_clip(media.path, **reading)
        except (VideoReadError, ValueError, OSError) as err:
            raise RequestError(f"Cannot read {media.label} as a video: {public_message(err, media)}",
                               code="invalid_video", param=ref.param) from err  # fmt: skip

    def _image(self, ref: MediaRef, media):
        from PIL import Image

        try:
            with Image.open(media.path) as image:
                return image.convert("RGB")
        except Exception as err:  # PIL raises several types for files that are not images
            raise RequestError(f"Cannot read {media.label} as an image.", code="invalid_image",
                               param=ref.param) from err  # fmt: skip

    def inputs(self, jobs: Sequence[ChatJob], *, on_model: bool = True) -> dict[str, Any]:
        """The stock processor's left-padded batch for prepared jobs (every frame read is kept), on the model's
        device (`on_model=False`: on the host, where the processor made it)."""
        kwargs: dict[str, Any] = {}
        clips = [clip for job in jobs for clip in job.clips]
        images = [image for job in jobs for image in job.images]
        if clips:
            kwargs.update(videos=[c.frames for c in clips], video_metadata=[c.metadata() for c in clips],
                          do_sample_frames=False)  # fmt: skip
        if images:
            kwargs["images"] = images
        texts = [job.prompt for job in jobs]
        inputs = self.processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs)
        inputs.pop("token_type_ids", None)
        return self._to_model(dict(inputs)) if on_model else dict(inputs)

    def _to_model(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    def batch_inputs(self, jobs: Sequence[ChatJob]) -> tuple[dict[str, Any], bool]:
        """The batch of prepared jobs: their one-row inputs put together (`collate.collate`), or, where those cannot
        be, the processor's batch (`inputs`); and whether it is the rows' own tensors put together."""
        batch = collate([job.inputs for job in jobs], self.processor.tokenizer.pad_token_id)
        return (batch, True) if batch is not None else (self.inputs(jobs), False)

    # ------------------------------------------------------------------------------------------- running
    def batch_key(self, job: ChatJob) -> tuple | None:
        """Jobs with equal keys may run as one batch; None: this job runs alone."""
        sampling = job.sampling.batch_key()
        if sampling is None or self.settings.max_batch_size < 2:
            return None
        frames = tuple(len(clip.frames) for clip in job.clips) if self.stacks_videos else ()
        return (job.model, sampling, frames, bool(job.images))

    def run_batch(self, jobs: Sequence[ChatJob]) -> None:
        """Run prepared jobs now (in this thread), in batches of compatible jobs; each job is finished (result or
        error) when this returns."""
        groups: dict[Any, list[ChatJob]] = {}
        for job in jobs:
            key = self.batch_key(job)
            groups.setdefault(key if key is not None else id(job), []).append(job)
        size = max(1, self.settings.max_batch_size)
        for group in groups.values():
            for start in range(0, len(group), size):
                self._run_group(group[start : start + size])

    def _run_group(self, jobs: list[ChatJob]) -> None:
        ready = []
        with self._model_lock:
            for job in jobs:
                if job.cancelled.is_set():
                    job.finish(Completion("", "cancelled", 0, 0))
                    continue
                try:
                    ready.append((job, *self._encode(job)))
                except Exception as err:  # a job's own error (e.g. over the context) ends only that job
                    self._fail(job, err)
            if not ready:
                return
            try:
                rows = self._generate([job for job, *_ in ready], [entry for _, entry, _, _ in ready])
            except Exception as err:
                for job, *_ in ready:
                    self._fail(job, err)
                return
            self.counters["batches"] += 1
            for (_, _, prompt_tokens, _), row in zip(ready, rows, strict=True):
                self.counters["requests"] += 1
                self.counters["prompt_tokens"] += prompt_tokens
                self.counters["completion_tokens"] += len(row.tokens)
        for (job, _, prompt_tokens, hit), row in zip(ready, rows, strict=True):
            job.finish(Completion(row.text, row.finish_reason or "length", prompt_tokens, len(row.tokens), hit))

    def _fail(self, job: ChatJob, error: Exception) -> None:
        self.counters["errors"] += 1  # (under the model lock, or at close)
        job.finish(error=error)

    def _activate(self, job: ChatJob) -> None:
        """Make the job's adapter the active one (the model lock held)."""
        if job.adapter is not None and self.model.active_adapter != job.adapter:
            self.model.set_adapter(job.adapter)

    def _entry(self, job: ChatJob, *, prefix: bool = True) -> tuple[CachedVideos | None, bool]:
        """The job's encode-cache entry (None without videos or in `base` mode), its videos encoded now if new, and
        whether they were encoded already; the model lock held, the job's adapter active. prefix: encode new videos
        with the prompt prefix's KV cache (later one-row questions about them continue it); False: the videos only,
        for calls that do not `generate` from it."""
        if job.cache_key is None:
            return None, False
        entry = self.cache.get(job.cache_key)
        hit = entry is not None and entry.encoded is not None
        if not hit:
            entry = CachedVideos(job.clips)
            text = () if prefix else ("input_ids", "attention_mask")
            with self._mode(job.mode)():
                entry.encoded = self.model.encode(**{k: v for k, v in job.inputs.items() if k not in text})
        self.cache.put(job.cache_key, entry)
        return entry, hit

    def _encode(self, job: ChatJob) -> tuple[CachedVideos | None, int, bool]:
        """The job's cached videos (`_entry`), the fitted prompt length, and whether they were cached; a prompt over
        the context is refused."""
        self._activate(job)
        entry, hit = self._entry(job)
        if job.mode == "base":
            length = job.inputs["input_ids"].shape[1]
        else:
            encoded = entry.encoded if entry is not None else None
            length = self.model.prepare_inputs(**job.inputs, encoded=encoded).input_ids.shape[1]
        if length + job.sampling.max_tokens > self.max_model_len:
            raise RequestError(
                f"This model's context is {self.max_model_len} tokens; the prompt takes {length} and max_tokens asks "
                f"for {job.sampling.max_tokens} more. Ask for fewer frames or tokens.",
                code="context_length_exceeded", param="messages",
            )  # fmt: skip
        return entry, length, hit

    def _generate(self, jobs: list[ChatJob], entries: list[CachedVideos | None]) -> list[AnswerRow]:
        first = jobs[0]
        tokenizer = self.processor.tokenizer
        rows = [AnswerRow(tokenizer, self.eos_ids, job.sampling.max_tokens, job.sampling.stop, job.on_text,
                          job.cancelled) for job in jobs]  # fmt: skip
        encoded = _merged([e.encoded for e in entries if e is not None and e.encoded is not None])
        inputs, collated = (first.inputs, False) if len(jobs) == 1 else self.batch_inputs(jobs)
        if collated and encoded is not None:
            self._carry_digests(jobs, entries, inputs, encoded)
        sampling = first.sampling
        kwargs: dict[str, Any] = {"max_new_tokens": max(job.sampling.max_tokens for job in jobs),
                                  "stopping_criteria": StoppingCriteriaList([AnswerRows(rows)]),
                                  "pad_token_id": self.pad_id, "do_sample": not sampling.greedy}  # fmt: skip
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
        seeded = sampling.seed is not None and not sampling.greedy
        devices = [self.model.device] if seeded and self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seeded), self._mode(first.mode)():
            if seeded:
                torch.manual_seed(sampling.seed)
            self.model.generate(**inputs, encoded=encoded, **kwargs)
        return rows

    def _carry_digests(
        self, jobs: list[ChatJob], entries: list[CachedVideos | None], batch: dict[str, Any], merged: EncodedVideos
    ) -> None:
        """Give a collated batch's video pixels the digests of its rows' (memo hits): the batch holds its rows'
        videos in row order, copied bit for bit, so it need not hash them again."""
        if batch.get("pixel_values_videos") is None:
            return
        family = self.model.family
        rows: list[tuple[torch.Tensor, str]] = []
        for job, entry in zip(jobs, entries, strict=True):
            if job.inputs.get("pixel_values_videos") is None:
                continue
            if entry is None or entry.encoded is None:
                return
            rows += [(pixels, entry.encoded.fingerprint(pixels)) for pixels, _ in family.video_pixels(job.inputs)]
        views = [pixels for pixels, _ in family.video_pixels(batch)]
        if [(v.shape, v.dtype) for v in views] != [(p.shape, p.dtype) for p, _ in rows]:
            return  # not the layout this relies on: the batch hashes its pixels itself
        for view, (_, digest) in zip(views, rows, strict=True):
            merged.remember(view, digest)

    # ------------------------------------------------------------------------------------------- the worker
    def submit(self, job: ChatJob) -> ChatJob:
        """Queue a prepared job for the worker thread (started on first use); returns it (wait on `job.done`)."""
        with self._wakeup:
            if self._stopping:
                raise RequestError("The server is shutting down; try again.", status=503, code="shutting_down")
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="slowfast-engine", daemon=True)
                self._worker.start()
            self._queue.append(job)
            self._wakeup.notify()
        return job

    def _work(self) -> None:
        while True:
            with self._wakeup:
                while not self._queue and not self._stopping:
                    self._wakeup.wait()
                if self._stopping:
                    return
                key = self.batch_key(self._queue[0])
                size = max(1, self.settings.max_batch_size)
                batch = [self._queue[0]] if key is None else [j for j in self._queue if self.batch_key(j) == key]
                batch = batch[:size]
                self._queue = [j for j in self._queue if all(j is not b for b in batch)]
            self._run_group(batch)

    def close(self) -> None:
        """Stop the worker thread after the batch it is running; queued jobs end with a 503 error."""
        with self._wakeup:
            self._stopping = True
            queued, self._queue = self._queue, []
            self._wakeup.notify_all()
        for job in queued:
            self._fail(job, RequestError("The server is shutting down; try again.", status=503, code="shutting_down"))
        if self._worker is not None:
            self._worker.join()

    def chat(self, messages: list[dict], *, model: str | None = None, **options: Any) -> Completion:
        """Answer one chat request and wait for it (through the worker); `options`: `sampling` (`SamplingParams`),
        `frames` (`FrameSampling`), `on_text`. Raises what the request failed with."""
        job = ChatJob(model or self.model_ids[0], messages, **options)
        self.submit(self.prepare(job)).done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    # ---- in-process front ends (Gradio app, lmms-eval plugin)
    # Jobs these front ends prepare with `prepare_read`, and the calls the engine does not make itself: the app's
    # per-frame map (`where_it_looked`), the plugin's continuation scores and its beam search.
    def cached_clips(self, model: str, video_keys: Sequence[str]) -> list[VideoClip] | None:
        """The frames of a prompt's videos when the encode cache holds them for the model id `model` (`video_keys`
        as given to `prepare_read`), else None: a front end that reads files itself need not read them again."""
        job = ChatJob(model, [])
        job.adapter, job.mode = self._resolve(model)
        key = self._read_key(job, (), video_keys)
        entry = self.cache.peek(key) if key is not None else None
        return entry.clips if entry is not None else None

    def prepare_as(self, job: ChatJob, like: ChatJob) -> ChatJob:
        """Prepare `job` as the prepared `like` (prompt, frames, inputs, encode-cache entry) under `job.model`'s own
        mode, e.g. the fast-only answer beside the slow-fast one. Sharing the entry is exact: the videos' features
        and slow K/V do not depend on the mode, and only slow-fast `generate` calls read its prompt prefix."""
        job.adapter, job.mode = self._resolve(job.model)
        if job.mode != "base" and job.adapter != like.adapter:
            raise ValueError(f"{job.model!r} and {like.model!r} use different adapters: prepare each on its own.")
        job.prompt, job.clips, job.images, job.inputs = like.prompt, like.clips, like.images, like.inputs
        job.cache_key = like.cache_key if job.mode != "base" else None
        return job

    def call_model(self, job: ChatJob, call: Callable[[CachedVideos | None], Any], *, prefix: bool = True) -> Any:
        """`call(entry)` with the model held for the prepared `job` (its adapter active, its mode on; the worker
        waits meanwhile); entry: the job's encode-cache entry, its videos encoded now if new (None without videos
        or in `base` mode). prefix=False encodes new videos without the prompt prefix (for calls that do not
        `generate` from it). Returns what `call` returns."""
        with self._model_lock:
            self._activate(job)
            entry, _ = self._entry(job, prefix=prefix)
            with self._mode(job.mode)():
                return call(entry)

    @torch.no_grad()
    def continuation_loss(
        self,
        model: str,
        conversation: list[dict],
        continuation: str,
        *,
        clips: Sequence[VideoClip] = (),
        images: Sequence[Any] = (),
        video_keys: Sequence[str] | None = None,
    ) -> tuple[float, bool]:
        """How likely `continuation` is as the answer to `conversation` (arguments as `prepare_read`'s): (mean
        negative log-probability of its tokens after the chat prompt, whether greedy decoding gives exactly those
        tokens). One forward; the videos come from the encode cache (encoded without a prompt prefix if new)."""
        job = ChatJob(model, [])
        job.adapter, job.mode = self._resolve(model)
        job.cache_key = self._read_key(job, clips, video_keys)  # the entry `prepare_read` keys these videos under
        prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        job.clips, job.images, job.prompt = list(clips), list(images), prompt + continuation
        job.inputs = self.inputs([job])
        tokenizer = self.processor.tokenizer
        count = len(tokenizer(job.prompt)["input_ids"]) - len(tokenizer(prompt)["input_ids"])
        if count < 1:
            raise ValueError(f"Empty continuation: {continuation!r}.")

        def forward(entry: CachedVideos | None) -> torch.Tensor:  # the fitted sequence ends with the same tokens
            encoded = entry.encoded if entry is not None else None
            return self.model(**job.inputs, encoded=encoded).logits[0, -count - 1 : -1].float()

        logprobs = torch.log_softmax(self.call_model(job, forward, prefix=False), dim=-1)
        target = job.inputs["input_ids"][0, -count:]
        loss = -float(logprobs.gather(-1, target[:, None]).mean())
        return loss, bool((logprobs.argmax(-1) == target).all())

    @torch.no_grad()
    def run_beam_search(self, jobs: Sequence[ChatJob], num_beams: int) -> None:
        """Run greedy prepared jobs with beam search (`num_beams` beams), one at a time: the best beam's text, cut
        at the first stop string (`prompt_tokens`: the processor's prompt length). Not streamed and not cancellable
        (`run_batch` follows rows step by step, which beams reorder); each job is finished (result or error) when
        this returns."""
        for job in jobs:
            try:
                if not job.sampling.greedy:
                    raise ValueError("Beam search here is deterministic: give temperature 0.")

                def generate(entry: CachedVideos | None, job: ChatJob = job) -> torch.Tensor:
                    encoded = entry.encoded if entry is not None else None  # (beams skip the one-row prompt prefix)
                    return self.model.generate(
                        **job.inputs, encoded=encoded, num_beams=num_beams, do_sample=False,
                        max_new_tokens=job.sampling.max_tokens, pad_token_id=self.pad_id)  # fmt: skip

                prompt_tokens = job.inputs["input_ids"].shape[1]
                tokens = self.call_model(job, generate)[0, prompt_tokens:].tolist()
                row = AnswerRow(self.processor.tokenizer, self.eos_ids, job.sampling.max_tokens, job.sampling.stop)
                for token in tokens:
                    row.add(token)
                job.finish(Completion(row.text, row.finish_reason or "length", prompt_tokens, len(row.tokens)))
            except Exception as err:  # a job's own error ends only that job
                self._fail(job, err)


def frames_digest(clip: VideoClip) -> str:
    """The identity of a clip's frames: `encoded.fingerprint` of its pixels (shape, dtype, SHA-256 of the bytes)."""
    return fingerprint(torch.from_numpy(np.ascontiguousarray(clip.frames)))


def _merged(caches: list[EncodedVideos]) -> EncodedVideos | None:
    """One `EncodedVideos` holding the videos and slow K/V of `caches` (the same model and projector), for a batch
    whose prompts' videos were encoded separately. Prompt prefixes are one-row only and are left out."""
    if len(caches) <= 1:
        return caches[0] if caches else None
    merged = EncodedVideos(owner=caches[0].owner, projector=caches[0].projector)
    for cache in caches:
        merged.videos.update(cache.videos)
        merged.slow_kv.update(cache.slow_kv)
    return merged
