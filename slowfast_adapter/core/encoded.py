"""Encode once, ask many: videos' features, slow K/V and prompt-prefix KV caches kept between calls.

`EncodedVideos` is the cache (videos matched by a digest of their pixels); `encode` and `generate_inputs` are the
wrapper's `encode` and its prompt-prefix reuse. How matching and the prefix work: docs/internals.md.
"""

from __future__ import annotations

import copy
import hashlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import state, surface
from .types import PreparedInputs, VideoFeatures


def fingerprint(pixels: torch.Tensor) -> str:
    """The identity of one video's pixel tensor: shape, dtype and a SHA-256 digest of its bytes (128 bits kept;
    SHA-256 rather than BLAKE2: CPUs with SHA extensions hash it about twice as fast, 1.8 vs 0.9 GB/s here)."""
    data = pixels.detach().contiguous().cpu()
    digest = hashlib.sha256(data.view(torch.uint8).numpy() if data.numel() else b"")  # no copy
    return f"{tuple(data.shape)}:{data.dtype}:{digest.hexdigest()[:32]}"


def _memo_key(pixels: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """(the tensor `pixels` views, or `pixels` itself; the memo key: its id and the view's place in it)."""
    owner = pixels._base if pixels._base is not None else pixels
    place = (pixels.storage_offset(), tuple(pixels.shape), pixels.stride(), pixels.dtype, pixels.device)
    return owner, (id(owner), *place)


def _parameters_state(tensors: list[torch.Tensor]) -> tuple:
    """What cached slow K/V were projected with: the tensors' identity and in-place version counters."""
    return tuple((id(t), surface.tensor_version(t)) for t in tensors)


@dataclass
class EncodedVideos:
    """Videos encoded once by `SlowFastModel.encode`, reused by `forward`/`generate(..., encoded=...)`.

    owner: id of the `SlowFastModel` that encoded them (another model's cache is refused).
    projector: the adapter whose projector copy produced the features (None: the base's own projector).
    videos: fingerprint -> `VideoFeatures`.
    slow_kv: (adapter module id, layer index, fingerprint) -> ((key, value) [H_kv, S, hd], parameter state); an
    entry is used only while the branch's and norm's parameters are the ones it was projected with (training
    after `encode` changes them in place, so their version counters move and the K/V are projected again).
    stats: "hits" / "misses": videos taken from the cache / encoded, over `encode` and every call that used it;
    "prefix_hits": `generate` calls that started from a cached prompt prefix.
    prefixes: (fitted prefix ids, its videos' fingerprints) -> `PromptPrefix` (see the module docstring).
    """

    owner: int
    projector: str | None
    videos: dict[str, VideoFeatures] = field(default_factory=dict)
    slow_kv: dict[tuple[int, int, str], tuple[tuple[torch.Tensor, torch.Tensor], tuple]] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"hits": 0, "misses": 0, "prefix_hits": 0})
    prefixes: dict[tuple[tuple[int, ...], tuple[str, ...]], PromptPrefix] = field(default_factory=dict)
    # (id of the tensor the pixels view, the view's place in it) -> (weak reference to that tensor, its version
    # counter, fingerprint): the several calls of one request (the engine's length check, `generate`) hash once
    digests: dict[tuple, tuple[weakref.ref, int, str]] = field(default_factory=dict, repr=False, compare=False)

    def fingerprint(self, pixels: torch.Tensor) -> str:
        """`fingerprint(pixels)`, remembered while the tensor that `pixels` views (or `pixels` itself) lives and is
        not changed in place through torch (its version counter). Writes that bypass the counter (`.data`, a NumPy
        view) are not seen: pass a new tensor after them."""
        if pixels.is_inference():  # no version counter
            return fingerprint(pixels)
        owner, key = _memo_key(pixels)
        memo = self.digests.get(key)
        if memo is not None and memo[0]() is owner and memo[1] == surface.tensor_version(pixels):
            return memo[2]
        digest = fingerprint(pixels)
        self.remember(pixels, digest)
        return digest

    def remember(self, pixels: torch.Tensor, digest: str) -> None:
        """Take `digest` as `fingerprint(pixels)` without hashing: for pixels copied bit for bit from pixels of
        that digest (a batch put together from its rows)."""
        if pixels.is_inference():
            return
        owner, key = _memo_key(pixels)
        digests = self.digests
        digests[key] = (weakref.ref(owner, lambda _: digests.pop(key, None)), surface.tensor_version(pixels), digest)

    def __len__(self) -> int:
        return len(self.videos)

    @property
    def nbytes(self) -> int:
        """Bytes held: video features, slow K/V and prompt-prefix KV caches."""
        kv = sum(t.numel() * t.element_size() for pair, _ in self.slow_kv.values() for t in pair)
        prefixes = sum(surface.cache_nbytes(prefix.cache) for prefix in self.prefixes.values())
        return sum(video.nbytes for video in self.videos.values()) + kv + prefixes

    def prefix_for(
        self, prepared: PreparedInputs, videos: tuple[str, ...] | None, parameters: tuple
    ) -> PromptPrefix | None:
        """The cached prefix that a one-row fitted prompt continues: the same tokens, the same videos (`videos`:
        their fingerprints in order, see `prepared_videos`), no visual token after it, the same parameters."""
        if prepared.input_ids.shape[0] != 1 or videos is None:
            return None
        ids = prepared.input_ids[0].tolist()
        for (key, key_videos), prefix in self.prefixes.items():
            if (
                len(key) < len(ids)
                and key_videos == videos
                and tuple(ids[: len(key)]) == key
                and not prepared.visual_mask[0, len(key) :].any()
                and prefix.parameters == parameters
            ):
                return prefix
        return None

    def __repr__(self) -> str:
        return f"EncodedVideos({len(self)} videos, {len(self.slow_kv)} slow K/V, {self.nbytes / 2**20:.1f} MiB)"

    def cached_kv(
        self, key: tuple[int, int, str], parameters: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self.slow_kv.get(key)
        if entry is None or entry[1] != _parameters_state(parameters):
            return None
        return entry[0]

    def store_kv(
        self, key: tuple[int, int, str], kv: tuple[torch.Tensor, torch.Tensor], parameters: list[torch.Tensor]
    ) -> None:
        self.slow_kv[key] = (kv, _parameters_state(parameters))

    def check_owner(self, owner: int, projector: str | None) -> None:
        if owner != self.owner:
            raise ValueError("`encoded` was made by another model: encode the videos with this model's `encode`.")
        if projector != self.projector:
            raise ValueError(
                f"`encoded` holds features from the projector of adapter {self.projector!r}, but the active "
                f"adapter uses {projector!r}'s: encode the videos again after `set_adapter`."
            )


@dataclass
class PromptPrefix:
    """The LLM's KV cache over a prompt's first tokens, up to and including its last visual token.

    cache: the `transformers.Cache` after the prefix (copied for every use); parameters: what it was computed with
    (`prefix_state`: the active adapter and every parameter's state)."""

    cache: Any
    parameters: tuple


def prepared_videos(prepared: PreparedInputs) -> tuple[str, ...] | None:
    """The fingerprints of a prepared prompt's slow items in order; None unless every one is a cached video."""
    if prepared.slow is None:
        return None
    keys = tuple(item.key for item in prepared.slow.items)
    return keys if keys and all(keys) else None


def parameters_state(module: torch.nn.Module) -> tuple:
    """Every parameter's identity and in-place version counter: changes when anything is trained or loaded."""
    return _parameters_state(list(module.parameters()))


def prefix_state(model: nn.Module) -> tuple:
    """What a prompt prefix's KV cache depends on: the active adapter (`set_adapter` changes which hybrid layers and
    LoRA run, not the parameters) and every parameter's state."""
    return (model.active_adapter, parameters_state(model))


PER_TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids", "token_type_ids")


def prefix_inputs(model_inputs: dict[str, Any], length: int) -> dict[str, Any]:
    """The base-model inputs of the first `length` tokens of a one-row prompt (per-token inputs cut)."""
    return {k: v[..., :length] if k in PER_TOKEN_INPUTS and torch.is_tensor(v) else v for k, v in model_inputs.items()}


def encoded_items(
    pixels: list[torch.Tensor],
    encode: Callable[[list[int]], list[VideoFeatures]],
    cache: EncodedVideos | None,
    *,
    tags: list[str] | None = None,
    store: bool = False,
) -> tuple[list[VideoFeatures], list[str | None]]:
    """Each video's features: from `cache` where it holds the same pixels, the rest by `encode(indices)`
    (one call for all missing videos, returning their `VideoFeatures` in order). Returns the features and
    each video's fingerprint (None without a cache). tags: more identity per video (e.g. its patch grid).
    With `store`, newly encoded videos are added to the cache."""
    if cache is None:
        return encode(list(range(len(pixels)))), [None] * len(pixels)
    keys = [cache.fingerprint(p) + (f":{tag}" if tags else "") for p, tag in zip(pixels, tags or pixels, strict=True)]
    first = {key: i for i, key in reversed(list(enumerate(keys)))}  # a video repeated in the batch: encoded once
    missing = [i for key, i in sorted(first.items(), key=lambda item: item[1]) if key not in cache.videos]
    fresh = dict(zip((keys[i] for i in missing), encode(missing), strict=True)) if missing else {}
    cache.stats["hits"] += len(pixels) - len(missing)
    cache.stats["misses"] += len(missing)
    if store:
        cache.videos.update(fresh)
    return [fresh[key] if key in fresh else cache.videos[key] for key in keys], keys


# ------------------------------------------------------------------------------ the wrapper's encode and reuse
def encode(model: nn.Module, inputs: dict[str, Any], into: EncodedVideos | None) -> EncodedVideos:
    """`SlowFastModel.encode` of `model` (see its docstring): the videos of `inputs` and their slow K/V added to
    `into` (or a new `EncodedVideos`); with one prompt, also its prefix's KV cache."""
    encoded = into if into is not None else EncodedVideos(owner=id(model), projector=model.projector_adapter)
    encoded.check_owner(id(model), model.projector_adapter)
    input_ids = inputs.get("input_ids")
    if input_ids is not None and input_ids.shape[0] == 1 and state.current_mode(id(model)) == "slowfast":
        _encode_prompt(model, {k: v for k, v in inputs.items() if k != "labels"}, encoded)
        return encoded
    videos = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "labels")}
    slow = model.family.encode_videos(model.base_model, model.slowfast_config, videos, encoded)
    if slow is not None:
        empty_prompt = torch.zeros(slow.mask.shape[0], 0, dtype=torch.bool)
        model.slow_context_for_tokens(slow, empty_prompt, encoded=encoded, store_kv=True)
    return encoded


def _encode_prompt(model: nn.Module, inputs: dict[str, Any], encoded: EncodedVideos) -> None:
    """One prompt: add its videos and their slow K/V to `encoded`, and keep the LLM's KV cache of the prompt up
    to its last visual token (see the module docstring) when every visual input of the prompt is a cached video."""
    prepared = model.family.prepare(model.base_model, model.slowfast_config, inputs, encoded=encoded, store=True)
    context = model.slow_context(prepared, encoded, store_kv=True)  # projects and stores the slow K/V
    videos = prepared_videos(prepared)
    if context is None or videos is None or inputs.get("pixel_values") is not None:
        return  # images are not cached: a prefix holding one could not be matched to it later
    length = int(prepared.visual_mask[0].nonzero()[-1]) + 1
    if length >= prepared.input_ids.shape[1]:
        return  # nothing after the video to ask
    with state.activated(context):
        output = model.base_model(**prefix_inputs(prepared.model_inputs, length), use_cache=True, logits_to_keep=1)
    key = (tuple(prepared.input_ids[0, :length].tolist()), videos)
    encoded.prefixes[key] = PromptPrefix(surface.output_cache(output), prefix_state(model))


def generate_inputs(
    model: nn.Module, prepared: PreparedInputs, encoded: EncodedVideos | None, context: state.SlowContext | None
) -> dict[str, Any]:
    """The base `generate`'s inputs for `prepared`: from a copy of the cached prompt prefix's KV cache when
    `encoded` holds one this prompt continues (only the rest of the prompt is prefilled), else as prepared."""
    model_inputs = prepared.model_inputs
    if encoded is None or context is None or context.frame_attention is not None:  # maps cover every token
        return model_inputs
    if _sequences_per_prompt(model, model_inputs) > 1:  # beams / several sequences: the prefix cache has one row
        return model_inputs
    prefix = encoded.prefix_for(prepared, prepared_videos(prepared), prefix_state(model))
    if prefix is None:
        return model_inputs
    encoded.stats["prefix_hits"] += 1
    model_inputs = {k: v for k, v in model_inputs.items() if k != surface.ENCODER_OUTPUTS_KWARG}
    model_inputs[surface.cache_kwarg(model.base_model)] = copy.deepcopy(prefix.cache)
    model.family.forget_generate_state(model.base_model)
    return model_inputs


def _sequences_per_prompt(model: nn.Module, generate_kwargs: dict[str, Any]) -> int:
    """How many rows `generate` expands each prompt into (beams x returned sequences), from its keyword arguments,
    a `generation_config` among them, or the model's own generation config."""
    config = generate_kwargs.get("generation_config") or model.base_model.generation_config
    beams = generate_kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
    returned = generate_kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1
    return int(beams) * int(returned)
