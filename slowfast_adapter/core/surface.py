"""The fence: every transformers / PEFT / torch internal that slowfast-adapter touches, in one module.

Nothing else in the library reads an internal attribute or keyword name of the base model. Each
accessor below fails loudly, with a `SurfaceError` that names the internal and the installed versions,
instead of silently running without the slow path. `check_model` runs every attribute check once, at
wrap time; `tests/test_surface.py` checks the keyword arguments the hooks receive, in prefill and in
decode, for every family on the installed transformers.

Internals and where they are used:
- decoder stack: `model.model.language_model` (its forward takes `inputs_embeds` and the KV cache, a
  `transformers.Cache`) and its `.layers`; per layer `self_attn`, `input_layernorm`; per attention
  `q_proj`, `k_proj`, `v_proj`, `o_proj`, optional `q_norm`, `head_dim`, `scaling`,
  `num_key_value_groups`, and `config._attn_implementation`;
- hook arguments: `self_attn` is called with `hidden_states` and `position_embeddings=(cos, sin)`;
- vision: `model.model.get_video_features` / `get_image_features` (their `.pooler_output`; Qwen3-VL's
  `.deepstack_features`) and the base forward's `mm_encoder_outputs` argument (transformers 5.18+);
- checkpointing: `activation_checkpointing_enable(activation_checkpointing_kwargs=...)`, or
  `gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)` on releases without it;
- PEFT: `peft.tuners.lora.LoraLayer` (`lora_A`, `adapter_layer_names`, `get_base_layer`), `peft.functional`;
- torch: `torch.utils._python_dispatch.TorchDispatchMode`, `torch.utils._pytree`, and
  `aten._scaled_dot_product_flash_attention_for_cpu` (FLOP counting), `torch._dynamo.utils.counters` (benchmarks);
- compiling: `CompileConfig._compile_all_devices` (compiled decode on the CPU).
"""

from __future__ import annotations

import importlib.metadata
import inspect
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from transformers import Cache

__all__ = ["TorchDispatchMode", "tree_leaves", "tree_map"]  # torch internals the FLOP counter uses, fenced here

TESTED_TRANSFORMERS = ">=5.18,<5.25"
"""The transformers releases the test suite runs on (CI: the newest and the oldest); pyproject.toml declares it."""

ATTENTION_HIDDEN_KWARG = "hidden_states"
ATTENTION_ROPE_KWARG = "position_embeddings"
ENCODER_OUTPUTS_KWARG = "mm_encoder_outputs"
LANGUAGE_MODEL_INPUT_KWARGS = ("inputs_embeds", "input_ids")
ATTENTION_MODULE_ATTRIBUTES = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "num_key_value_groups")


class SurfaceError(RuntimeError):
    """An internal of transformers / PEFT / torch that slowfast-adapter relies on is missing or changed."""


def versions() -> str:
    """The installed versions that matter, for error messages."""
    names = ("transformers", "torch", "peft")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - all three are dependencies
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def changed(internal: str, detail: str = "") -> SurfaceError:
    """The error for a missing or changed internal: names it, the installed versions and the tested range."""
    detail = f" {detail}" if detail else ""
    return SurfaceError(
        f"slowfast-adapter relies on `{internal}`, which is missing or changed here ({versions()}).{detail} "
        f"The tested range is transformers{TESTED_TRANSFORMERS}: install one of those "
        f"(pip install 'transformers{TESTED_TRANSFORMERS}') or report this with the versions above."
    )


def _attribute(obj: Any, name: str, where: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise changed(f"{where}.{name}", f"{type(obj).__name__} has no attribute {name!r}.") from None


# ---------------------------------------------------------------------------------------- decoder stack
def language_model(model: nn.Module) -> nn.Module:
    """The text decoder of a supported base model: `model.model.language_model`."""
    return _attribute(_attribute(model, "model", type(model).__name__), "language_model", "model.model")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """`model.model.language_model.layers`: the decoder layers, in order."""
    return _attribute(language_model(model), "layers", "model.model.language_model")


def self_attention(layer: nn.Module) -> nn.Module:
    return _attribute(layer, "self_attn", "decoder layer")


def input_norm(layer: nn.Module) -> nn.Module:
    return _attribute(layer, "input_layernorm", "decoder layer")


def attention_attribute(attn: nn.Module, name: str) -> Any:
    """One of `ATTENTION_MODULE_ATTRIBUTES` of a decoder layer's `self_attn`."""
    return _attribute(attn, name, "self_attn")


def query_norm(attn: nn.Module) -> nn.Module | None:
    """The per-head query norm of families that have one (Qwen3-VL), else None."""
    return getattr(attn, "q_norm", None)


def attention_implementation(attn: nn.Module) -> str:
    """`self_attn.config._attn_implementation` ('sdpa', 'eager', 'flash_attention_2', ...)."""
    implementation = getattr(_attribute(attn, "config", "self_attn"), "_attn_implementation", None)
    if not isinstance(implementation, str):
        raise changed("self_attn.config._attn_implementation", f"got {implementation!r}.")
    return implementation


def check_model(model: nn.Module) -> None:
    """Check every attribute the hybrid layers use, on every decoder layer (raises `SurfaceError`)."""
    layers = decoder_layers(model)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise changed("model.model.language_model.layers", f"expected a non-empty ModuleList, got {type(layers)}.")
    for layer in layers:
        attn = self_attention(layer)
        input_norm(layer)
        for name in ATTENTION_MODULE_ATTRIBUTES:
            attention_attribute(attn, name)
        attention_implementation(attn)
    # The class's own signature, by name: before 5.18 `**kwargs` swallowed the keyword and the base model ran
    # on bare placeholder embeddings (wrong outputs, no error).
    if ENCODER_OUTPUTS_KWARG not in inspect.signature(type(model).forward).parameters:
        raise changed(f"{type(model).__name__}.forward({ENCODER_OUTPUTS_KWARG}=...)", "It is new in transformers 5.18.")
    for name in ("get_video_features", "get_image_features"):
        _attribute(model.model, name, "model.model")


# ------------------------------------------------------------------------------------- hook arguments
def attention_hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    """`self_attn`'s input hidden states [B, L, D] (keyword `hidden_states`, or the first positional)."""
    hidden = kwargs.get(ATTENTION_HIDDEN_KWARG, args[0] if args else None)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise changed(f"self_attn({ATTENTION_HIDDEN_KWARG}=...)", f"got {type(hidden).__name__} instead of [B, L, D].")
    return hidden


def attention_rope(kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`self_attn`'s `position_embeddings=(cos, sin)`, each [B or 1, L, head_dim]."""
    value = kwargs.get(ATTENTION_ROPE_KWARG)
    if not (isinstance(value, tuple | list) and len(value) == 2):
        raise changed(f"self_attn({ATTENTION_ROPE_KWARG}=(cos, sin))", f"got {type(value).__name__}.")
    return value[0], value[1]


def language_model_step(args: tuple, kwargs: dict) -> tuple[int, int | None]:
    """(tokens in this call, tokens already in its KV cache or None without a cache) from the language
    model's forward arguments. The cache is found by type (`transformers.Cache`), not by keyword name,
    which transformers renamed in 5.24 (`past_key_values` -> `cache`)."""
    length = None
    for name in LANGUAGE_MODEL_INPUT_KWARGS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            length = value.shape[1]
            break
    if length is None and args and isinstance(args[0], torch.Tensor):
        length = args[0].shape[1]
    if length is None:
        raise changed("language_model(inputs_embeds=...)", "the language model was called without its inputs.")
    caches = [v for v in (*args, *kwargs.values()) if isinstance(v, Cache)]
    return length, caches[0].get_seq_length() if caches else None


def cache_kwarg(module: nn.Module) -> str:
    """The keyword under which `module.forward` takes a KV cache: `cache` from transformers 5.24 on,
    `past_key_values` before."""
    parameters = inspect.signature(module.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise changed(f"{type(module).__name__}.forward(cache=... | past_key_values=...)")


def output_cache(output: Any) -> Cache:
    """The KV cache of a model output, found by type (its field name follows the keyword's rename)."""
    caches = [value for value in output.values() if isinstance(value, Cache)]
    if len(caches) != 1:
        raise changed(f"{type(output).__name__}.cache", f"found {len(caches)} transformers.Cache values.")
    return caches[0]


def run_language_model(model: nn.Module, inputs_embeds: torch.Tensor, cache: Any) -> torch.Tensor:
    """Run the text decoder on `inputs_embeds` [B, L, D] with a KV cache; returns the last hidden states."""
    decoder = language_model(model)
    return decoder(inputs_embeds=inputs_embeds, use_cache=True, **{cache_kwarg(decoder): cache}).last_hidden_state


# ------------------------------------------------------------------------------------------------ vision
def video_features(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """`model.model.get_video_features(...)`: an output with `.pooler_output`."""
    return _output_with_pooler(_attribute(model.model, "get_video_features", "model.model")(*args, **kwargs))


def image_features(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """`model.model.get_image_features(...)`: an output with `.pooler_output`."""
    return _output_with_pooler(_attribute(model.model, "get_image_features", "model.model")(*args, **kwargs))


def _output_with_pooler(output: Any) -> Any:
    if getattr(output, "pooler_output", None) is None:
        raise changed("get_video_features(...).pooler_output", f"got {type(output).__name__}.")
    return output


def deepstack_features(output: Any) -> list:
    """Qwen3-VL's per-layer deepstack features of a `get_video_features` output."""
    return _attribute(output, "deepstack_features", "get_video_features(...)")


# --------------------------------------------------------------------------------------- checkpointing
def enable_checkpointing(model: nn.Module, checkpoint_kwargs: dict, **kwargs: Any) -> None:
    """Activation checkpointing of every decoder layer with `torch.utils.checkpoint` kwargs."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=checkpoint_kwargs, **kwargs)
    else:  # transformers releases before activation_checkpointing_enable
        _attribute(model, "gradient_checkpointing_enable", type(model).__name__)(
            gradient_checkpointing_kwargs=checkpoint_kwargs, **kwargs
        )


# ------------------------------------------------------------------------------------- torch internals
def cpu_sdpa_op() -> Any:
    """`aten._scaled_dot_product_flash_attention_for_cpu`: what SDPA runs on real CPU tensors (no FLOP formula)."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        raise changed("torch.ops.aten._scaled_dot_product_flash_attention_for_cpu") from None


def tensor_version(tensor: torch.Tensor) -> int:
    """`tensor._version`: autograd's counter of in-place changes (an optimizer step bumps it)."""
    version = getattr(tensor, "_version", None)
    if not isinstance(version, int):
        raise changed("torch.Tensor._version", "cached slow K/V can no longer tell when the adapter was trained.")
    return version


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a KV cache's tensors (`cache.layers[i].keys / .values`)."""
    layers = _attribute(cache, "layers", type(cache).__name__)
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values) if t is not None)


def forget_rope_deltas(model: nn.Module) -> None:
    """Qwen-VL: drop the M-RoPE offset `model.model.rope_deltas` that `generate` kept from an earlier call, so a
    generate that starts from a prompt-prefix cache computes every position from its own prompt."""
    inner = _attribute(model, "model", type(model).__name__)
    _attribute(inner, "rope_deltas", type(inner).__name__)
    inner.rope_deltas = None


def rope_index(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Qwen-VL: the M-RoPE `position_ids` [3, B, L] the base model's forward computes for `inputs` (its own
    `model.model.get_rope_index`, given the same keyword arguments its `compute_3d_position_ids` passes)."""
    inner = _attribute(model, "model", type(model).__name__)
    get_rope_index = _attribute(inner, "get_rope_index", type(inner).__name__)
    names = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask", "second_per_grid_ts")
    position_ids, _ = get_rope_index(inputs["input_ids"], **{n: inputs[n] for n in names if inputs.get(n) is not None})
    return position_ids


def set_attention_implementation(config: Any, implementation: str) -> None:
    """`config._attn_implementation = implementation`: what a model built from `config` runs ('sdpa', 'eager', ...)."""
    config._attn_implementation = implementation


def compile_on_every_device(compile_config: Any) -> Any:
    """A transformers `CompileConfig` with `_compile_all_devices = True`, so `generate` compiles its decode step on the
    CPU too (transformers does so by itself only on CUDA); returns it."""
    compile_config._compile_all_devices = True
    return compile_config


def dynamo_counters() -> Any:
    """`torch._dynamo.utils.counters`: what Dynamo compiled (e.g. `counters["stats"]["unique_graphs"]`)."""
    from torch._dynamo.utils import counters

    return counters
