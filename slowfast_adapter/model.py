"""`SlowFastModel`: a base video MLLM with fast tokens in its sequence and slow tokens beside it."""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import adapter_io, frame_attention, hub, lora, state, surface
from .adapters import SlowFastAdapter
from .config import SlowFastConfig
from .encoded import EncodedVideos, PromptPrefix, parameters_state, prefix_inputs, prepared_videos
from .families import ModelFamily, family_for
from .files import DEFAULT_ADAPTER, LORA_SUBFOLDER, AdapterError
from .hybrid import HybridLayerHooks, compute_input, register_step_hook
from .types import PreparedInputs

if TYPE_CHECKING:
    from peft import LoraConfig


_WRAPPED_MARK = "_slowfast_adapter_wrapped"
"""Set on a base model's __dict__ while a SlowFastModel wraps it (removed by `unwrap`)."""


class SlowFastModel(nn.Module):
    """Wraps a base model: frozen base, trainable slow-fast parameters in named adapters.

    The base model's modules are not replaced (except by PEFT's LoRA layers, when LoRA is configured): hybrid
    layers attach through forward pre-hooks that act only while one of this model's calls is running (see
    `hybrid.py`), and `unwrap()` removes them. Attributes the wrapper does not define (config, device,
    generation_config, ...) come from the base.

    Adapters (PEFT-like): `slowfast_adapters[name]` holds each adapter's new modules; the one named
    `active_adapter` ("default" at first) runs; `add_adapter`, `load_adapter`, `set_adapter`,
    `delete_adapter` manage them. `slow_branches`, `slowfast_config` and `hybrid_layer_indices` are the
    active adapter's. In-memory parameter names are `slowfast_adapters.<name>.slow_branches.<layer>.<param>`,
    `slowfast_adapters.<name>.projectors.<i>.<param>`, and PEFT's `...lora_A.<name>.weight` in the base.
    """

    debug_reproject_slow_kv: bool = False
    """Debug/benchmark only: re-project slow K/V at every decode step (the reference's behaviour) instead of
    once per call. Same outputs, more compute; set it on an instance to measure what the cache saves."""

    def __init__(
        self,
        base_model: nn.Module,
        config: SlowFastConfig | None = None,
        *,
        lora_config: LoraConfig | None = None,
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        if isinstance(base_model, SlowFastModel):
            raise TypeError("The model is already a SlowFastModel; wrap its base (`model.unwrap()`) instead.")
        self._setup(base_model, adapter_name)
        try:
            self.add_adapter(adapter_name, config, lora_config=lora_config)
        except BaseException:
            self.unwrap()
            raise

    def _setup(self, base_model: nn.Module, adapter_name: str) -> None:
        self.family: ModelFamily = family_for(base_model)
        surface.check_model(base_model)
        if getattr(base_model, _WRAPPED_MARK, False):
            raise TypeError(
                f"This {type(base_model).__name__} is already wrapped by a SlowFastModel: two wrappers on one base "
                "would corrupt each other (hooks, LoRA, grad flags). Add another adapter to the existing wrapper "
                "(`model.add_adapter(name, config)` or `model.load_adapter(path, name)`, then `model.set_adapter`), "
                "or `model.unwrap()` it first."
            )
        base_model.__dict__[_WRAPPED_MARK] = True
        self.base_model = base_model
        self.slowfast_adapters = nn.ModuleDict()
        self.slowfast_configs: dict[str, SlowFastConfig] = {}
        self.lora_configs: dict[str, LoraConfig] = {}  # adapters with LoRA only
        self._active_adapter = adapter_name
        self._trainable: dict[str, bool] = {}  # adapter -> trains while active
        self._base_requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
        self._hooks: dict[str, list[HybridLayerHooks]] | None = {}
        self._extra_hooks: list[torch.utils.hooks.RemovableHandle] = []  # projector and LoRA base-mode hooks
        base_model.requires_grad_(False)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ----------------------------------------------------------------------------------------- calls
    def prepare_inputs(self, *, encoded: EncodedVideos | None = None, **inputs: Any) -> PreparedInputs:
        """The base-model inputs this wrapper runs: fast tokens in the sequence, slow tokens beside it."""
        self._check_wrapped()
        if encoded is not None:
            encoded.check_owner(id(self), self._projector_adapter())
        return self.family.prepare(self.base_model, self.slowfast_config, inputs, encoded=encoded)

    def forward(self, input_ids: torch.Tensor | None = None, *, encoded: EncodedVideos | None = None, **inputs: Any):
        """Same arguments as the base model's forward (the stock processor's output, labels, ...).

        The returned logits cover the fitted sequence (`prepare_inputs(...).input_ids`), which holds
        the fast tokens instead of the native video tokens; labels are fitted the same way.
        encoded: videos from `encode`, reused instead of encoding the same pixels again (same outputs).
        """
        mode = state.current_mode(id(self))
        if mode == "base":  # the base encodes its own native tokens; `encoded` holds slow-fast features
            with state.activated(None):
                return self.base_model(input_ids=input_ids, **inputs)
        prepared = self.prepare_inputs(input_ids=input_ids, encoded=encoded, **inputs)
        context = self._slow_context(prepared, encoded, looks=True) if mode == "slowfast" else None
        with state.activated(context):
            return self.base_model(**prepared.model_inputs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, *, encoded: EncodedVideos | None = None, **inputs: Any):
        """The base model's `generate`, with the slow path active at every step.

        Slow K/V are projected once per call and reused at every decode step. The returned sequences
        start with the caller's own `input_ids` (native placeholder count), followed by the new tokens,
        so `output[:, input_ids.shape[1]:]` is the answer as with the base model.
        encoded: videos from `encode`, reused instead of encoding the same pixels again (same answer).
        """
        mode = state.current_mode(id(self))
        if mode == "base":
            with state.activated(None):
                return self.base_model.generate(input_ids=input_ids, **inputs)
        prepared = self.prepare_inputs(input_ids=input_ids, encoded=encoded, **inputs)
        model_inputs = prepared.model_inputs
        context = self._slow_context(prepared, encoded, looks=True) if mode == "slowfast" else None
        prefix = None
        if encoded is not None and context is not None and context.frame_attention is None:  # maps cover every token
            prefix = encoded.prefix_for(prepared, prepared_videos(prepared), parameters_state(self))
        if prefix is not None:  # start from the prompt prefix's KV cache: only the rest of the prompt is prefilled
            encoded.stats["prefix_hits"] += 1
            model_inputs = {k: v for k, v in model_inputs.items() if k != surface.ENCODER_OUTPUTS_KWARG}
            model_inputs[surface.cache_kwarg(self.base_model)] = copy.deepcopy(prefix.cache)
            self.family.forget_generate_state(self.base_model)
        with state.activated(context):
            output = self.base_model.generate(**model_inputs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        new_tokens = sequences[:, prepared.input_ids.shape[1] :]
        prompt = input_ids.to(sequences.device).repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompt, new_tokens], dim=-1)
        if isinstance(output, torch.Tensor):
            output = sequences
        else:
            output.sequences = sequences
        if context is not None and context.frame_attention is not None:
            context.frame_attention.finish(new_tokens, output)
        return output

    @torch.no_grad()
    def encode(self, *, into: EncodedVideos | None = None, **inputs: Any) -> EncodedVideos:
        """Encode the videos of `inputs` (the stock processor's output; text keys are ignored) once, for later
        `forward`/`generate(..., encoded=...)` calls about the same videos.

        Runs the vision tower and projector on each video not yet in `into` and projects every hybrid layer's
        slow K/V (active adapter). Given one prompt (`input_ids` of one row), it also keeps the LLM's KV cache of
        the prompt up to its last visual token, which a later one-prompt `generate` starting with the same tokens
        continues from. Returns `into` (or a new `EncodedVideos`) with them added; its `nbytes` says what it
        holds. Follow-up calls still pass the processor's output for their prompt (same pixels).
        """
        self._check_wrapped()
        encoded = into if into is not None else EncodedVideos(owner=id(self), projector=self._projector_adapter())
        encoded.check_owner(id(self), self._projector_adapter())
        input_ids = inputs.get("input_ids")
        if input_ids is not None and input_ids.shape[0] == 1 and state.current_mode(id(self)) == "slowfast":
            self._encode_prompt({k: v for k, v in inputs.items() if k != "labels"}, encoded)
            return encoded
        videos = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "labels")}
        slow = self.family.encode_videos(self.base_model, self.slowfast_config, videos, encoded)
        if slow is not None:
            self.slow_context(
                slow, torch.zeros(slow.mask.shape[0], 0, dtype=torch.bool), encoded=encoded, store_kv=True
            )
        return encoded

    def _encode_prompt(self, inputs: dict[str, Any], encoded: EncodedVideos) -> None:
        """One prompt: add its videos and their slow K/V to `encoded`, and keep the LLM's KV cache of the prompt up
        to its last visual token (see `encoded.py`) when every visual input of the prompt is a cached video."""
        prepared = self.family.prepare(self.base_model, self.slowfast_config, inputs, encoded=encoded, store=True)
        context = self._slow_context(prepared, encoded, store_kv=True)  # projects and stores the slow K/V
        videos = prepared_videos(prepared)
        if context is None or videos is None or inputs.get("pixel_values") is not None:
            return  # images are not cached: a prefix holding one could not be matched to it later
        length = int(prepared.visual_mask[0].nonzero()[-1]) + 1
        if length >= prepared.input_ids.shape[1]:
            return  # nothing after the video to ask
        with state.activated(context):
            output = self.base_model(**prefix_inputs(prepared.model_inputs, length), use_cache=True, logits_to_keep=1)
        key = (tuple(prepared.input_ids[0, :length].tolist()), videos)
        encoded.prefixes[key] = PromptPrefix(surface.output_cache(output), parameters_state(self))

    def _projector_adapter(self) -> str | None:
        """The adapter whose projector copy encodes videos now (None: the base's own projector)."""
        config = self.slowfast_configs.get(self._active_adapter)
        return self._active_adapter if config is not None and config.train_projector else None

    def _slow_context(
        self,
        prepared: PreparedInputs,
        encoded: EncodedVideos | None = None,
        *,
        store_kv: bool = False,
        looks: bool = False,
    ) -> state.SlowContext | None:
        """The slow context of a call (None without slow tokens); `looks`: a forward/generate call, which records
        its per-frame maps inside `frame_attention.looking(self)`."""
        if prepared.slow is None:  # no visual input in the batch: exactly the base model
            return None
        queries = state.prompt_query_mask(prepared.visual_mask, self.slowfast_config.query_tokens)
        attention_mask = prepared.model_inputs.get("attention_mask")
        if attention_mask is not None:
            queries = queries & attention_mask.bool()
        context = self.slow_context(
            prepared.slow, queries, reproject_slow_kv=self.debug_reproject_slow_kv, encoded=encoded, store_kv=store_kv
        )
        if looks:
            frame_attention.attach(self, context, prepared.input_ids, attention_mask)
        return context

    def slow_context(
        self,
        slow: state.SlowTokens,
        prompt_query_mask: torch.Tensor,
        *,
        reproject_slow_kv: bool = False,
        encoded: EncodedVideos | None = None,
        store_kv: bool = False,
    ) -> state.SlowContext:
        """The per-call state of the active adapter for `slow` tokens (activate it with `state.activated`).

        prompt_query_mask: [B, L0] bool, the prompt tokens that query the slow tokens. Unless
        `reproject_slow_kv`, every hybrid layer's slow K/V are projected here, once per call and outside any
        checkpointed layer. Used by `forward`/`generate` and by the FLOP counter. encoded: K/V of videos
        encoded earlier are taken from it; with `store_kv`, those projected here are added to it (`encode`).
        """
        adapter = self._active_adapter
        # Owned by the active adapter: only its hybrid-layer hooks act during this call.
        context = state.SlowContext(
            owner=id(self.slowfast_adapters[adapter]),
            slow=slow,
            prompt_query_mask=prompt_query_mask,
            reproject_slow_kv=reproject_slow_kv,
            encoded=encoded,
            store_kv=store_kv,
        )
        if not reproject_slow_kv:
            for hooks in self._hooks[adapter]:
                hooks.slow_kv(context)
        return context

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Activation checkpointing on every decoder layer of the base, with the slow path recomputed too.

        Uses non-reentrant `torch.utils.checkpoint` with a `context_fn` that re-enters the forward's slow
        context during the backward recompute.
        """
        checkpoint_kwargs = dict(gradient_checkpointing_kwargs or {})
        if checkpoint_kwargs.get("use_reentrant"):
            raise ValueError("use_reentrant=True cannot recompute the slow path; leave it False (the default).")
        checkpoint_kwargs.update(use_reentrant=False, context_fn=state.checkpoint_context_fn)
        surface.enable_checkpointing(self.base_model, checkpoint_kwargs, **kwargs)

    activation_checkpointing_enable = gradient_checkpointing_enable

    # ------------------------------------------------------------------------------------ ablations
    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block (this thread), calls run the untouched base model: native video tokens, no LoRA, the
        base's own projector (each LoRA-wrapped linear then runs its base layer once more)."""
        with state.mode(id(self), "base"):
            yield

    @contextmanager
    def slow_path_disabled(self) -> Iterator[None]:
        """Within the block (this thread), calls use fast tokens only, without cross-attention (LoRA and a trained
        projector stay on)."""
        with state.mode(id(self), "fast_only"):
            yield

    # ------------------------------------------------------------------------------------- adapters
    @property
    def active_adapter(self) -> str:
        """The name of the adapter that runs (PEFT's `active_adapter`)."""
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self._active_adapter]

    @property
    def slow_branches(self) -> nn.ModuleDict:
        """The active adapter's hybrid-layer branches: layer index (str) -> `SlowBranch`."""
        return self.slowfast_adapters[self._active_adapter].slow_branches

    @property
    def slowfast_config(self) -> SlowFastConfig:
        """The active adapter's `SlowFastConfig` (it also sets the fast-token pooling of each call)."""
        return self.slowfast_configs[self._active_adapter]

    @property
    def hybrid_layer_indices(self) -> list[int]:
        return self.slowfast_adapters[self._active_adapter].hybrid_layer_indices

    def add_adapter(
        self, adapter_name: str, config: SlowFastConfig | None = None, *, lora_config: LoraConfig | None = None
    ) -> None:
        """Add a new, freshly initialised adapter (not activated: use `set_adapter`), trainable once active.

        LoRA comes from `config.lora_r` / `lora_*` or from `lora_config` (a `peft.LoraConfig`; its
        `target_modules` names are restricted to the language model's decoder layers, a regex is used as given).
        """
        self._check_wrapped()
        self._check_new_name(adapter_name)
        config = config if config is not None else SlowFastConfig()
        if not isinstance(config, SlowFastConfig):
            raise TypeError(f"config must be a SlowFastConfig, got {type(config).__name__}.")
        layers = self.family.decoder_layers(self.base_model)
        lora_config = lora.resolve_lora_config(config, lora_config, self.base_model, layers)
        adapter = SlowFastAdapter(self.base_model, self.family, config)
        self.slowfast_adapters[adapter_name] = adapter
        self.slowfast_configs[adapter_name] = config
        self._trainable[adapter_name] = True
        try:
            if lora_config is not None:
                self.lora_configs[adapter_name] = lora_config
                lora.inject(self.base_model, lora_config, adapter_name)
            self._after_adapter_change()
        except BaseException:
            self._drop_adapter(adapter_name)
            raise

    def load_adapter(
        self,
        path_or_hub_id: str | os.PathLike,
        adapter_name: str,
        *,
        revision: str | None = None,
        is_trainable: bool = False,
        token: str | None = None,
        subfolder: str | None = None,
        verify_checksums: bool = True,
    ) -> None:
        """Load a saved adapter (local folder or Hub repo) as `adapter_name`, beside the others (not activated).

        Refuses, with `AdapterError`, anything that does not match this base exactly; nothing changes then.
        `is_trainable=False` (PEFT's default) loads it frozen, for inference, in the base's dtype; True keeps saved
        fp32 weights in fp32 (see `from_pretrained`). `verify_checksums=False` skips the
        sha256 check of the files (for a folder edited on purpose).
        """
        self._check_wrapped()
        self._check_new_name(adapter_name)
        saved = _read_for(self.base_model, path_or_hub_id, revision=revision, token=token, subfolder=subfolder)
        with _must_fit(saved):
            self.add_adapter(adapter_name, saved.config, lora_config=_explicit_lora(saved))
        try:
            self._load_tensors(adapter_name, saved, verify_checksums=verify_checksums, keep_precision=is_trainable)
        except BaseException:
            self._drop_adapter(adapter_name)
            raise
        self.set_adapter_trainable(adapter_name, is_trainable)

    def _load_tensors(
        self, adapter_name: str, saved: adapter_io.SavedAdapter, *, verify_checksums: bool, keep_precision: bool = False
    ) -> None:
        """Copy a saved adapter's tensors into the (new) adapter `adapter_name`, checking keys and shapes, then
        (with `verify_checksums`) the files' sha256 against those recorded at save time.

        The adapter's modules have the base's dtype (`wrap`), and the saved tensors are cast to it: an fp32 adapter
        (trained under mixed precision) runs in bf16 on a bf16 base. With `keep_precision` (loading to train on)
        the slow branches and projector copy are first made fp32 where the file holds fp32 tensors, so training
        continues from the saved weights exactly rather than from their bf16 rounding (LoRA is loaded by PEFT, in
        its layers' dtype)."""
        if saved.lora_config is not None:  # LoRA rebuilt from the config's lora_* fields must be the saved one
            built = self.lora_configs.get(adapter_name)
            fields = ("r", "lora_alpha", "lora_dropout", "target_modules")
            if built is None or any(getattr(built, f) != getattr(saved.lora_config, f) for f in fields):
                raise AdapterError(
                    f"{saved.lora_path / adapter_io.CONFIG_NAME} does not match the LoRA that "
                    f"{saved.directory / adapter_io.CONFIG_NAME}'s slowfast_config gives on this base; the folder "
                    "mixes two saves or was edited."
                )
        adapter_io.check_keys_and_shapes(self.adapter_state_dict(adapter_name), saved.tensors, saved.weights_path)
        if saved.lora_tensors is not None:
            adapter_io.check_keys_and_shapes(self.lora_state_dict(adapter_name), saved.lora_tensors, saved.lora_path)
        if verify_checksums:
            saved.verify_checksums()
        if keep_precision and any(t.dtype == torch.float32 for t in saved.tensors.values()):
            for param in self.slowfast_adapters[adapter_name].parameters():
                if param.dtype in (torch.bfloat16, torch.float16):
                    param.data = param.data.to(torch.float32)
        adapter_io.copy_tensors(self.adapter_state_dict(adapter_name), saved.tensors)
        if saved.lora_tensors is not None:
            lora.load_state_dict(self.base_model, saved.lora_tensors, adapter_name)
            loaded = self.lora_state_dict(adapter_name)
            if not all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in saved.lora_tensors.items()):
                raise AdapterError(f"PEFT did not load every LoRA tensor of {saved.lora_path} exactly.")

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the adapter that runs (slow branches, projector and LoRA); model-wide, like PEFT."""
        self._check_wrapped()
        self._check_exists(adapter_name)
        self._active_adapter = adapter_name
        lora.activate(self.base_model, adapter_name)
        self._refresh_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter that is not active (its modules, LoRA and hooks)."""
        self._check_wrapped()
        self._check_exists(adapter_name)
        if adapter_name == self._active_adapter:
            raise ValueError(f"{adapter_name!r} is the active adapter: `set_adapter` another one before deleting it.")
        self._drop_adapter(adapter_name)

    def set_adapter_trainable(self, adapter_name: str, trainable: bool) -> None:
        """Whether `adapter_name`'s parameters train while it is active (loaded adapters start frozen)."""
        self._check_exists(adapter_name)
        self._trainable[adapter_name] = bool(trainable)
        self._refresh_trainable()

    def _check_exists(self, adapter_name: str) -> None:
        if adapter_name not in self.slowfast_adapters:
            raise ValueError(f"No adapter named {adapter_name!r}; loaded adapters: {list(self.slowfast_adapters)}.")

    def _check_new_name(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or any(c in adapter_name for c in "./\\"):
            raise ValueError(f"Adapter names are non-empty and have no '.', '/' or '\\\\': got {adapter_name!r}.")
        if not adapter_name.isprintable():  # NUL, newlines, other control and invisible format characters
            raise ValueError(
                f"Adapter names have no control or invisible characters (NUL, newline, tab): got {adapter_name!r}; "
                "pick a printable name (it becomes a folder name when saved)."
            )
        if adapter_name == LORA_SUBFOLDER:
            raise ValueError(f"{LORA_SUBFOLDER!r} is reserved (the LoRA subfolder of a saved adapter): pick another.")
        if adapter_name in self.slowfast_adapters:
            raise ValueError(f"An adapter named {adapter_name!r} exists already: pick another name or delete it.")

    def _drop_adapter(self, adapter_name: str) -> None:
        lora.remove_adapter(self.base_model, adapter_name)
        self.lora_configs.pop(adapter_name, None)
        self.slowfast_configs.pop(adapter_name, None)
        self._trainable.pop(adapter_name, None)
        if adapter_name in self.slowfast_adapters:
            del self.slowfast_adapters[adapter_name]
        if self.slowfast_adapters:
            self._after_adapter_change()
        else:
            self._remove_hooks()

    def _after_adapter_change(self) -> None:
        """Re-install every hook on the modules that are called now (LoRA layers may have replaced linears)."""
        self._remove_hooks()
        layers = self.family.decoder_layers(self.base_model)
        for name, adapter in self.slowfast_adapters.items():
            config = self.slowfast_configs[name]
            self._hooks[name] = [
                HybridLayerHooks(
                    owner=id(adapter),
                    layer_idx=idx,
                    decoder_layer=layers[idx],  # o_proj hook on `self_attn.o_proj`: the LoRA layer if there is one
                    branch=adapter.slow_branches[str(idx)],
                    query_rope=config.query_rope,
                    query_states=self.family.query_states,
                    rope=self.family.rope,
                )
                for idx in adapter.hybrid_layer_indices
            ]
        self._extra_hooks.append(
            register_step_hook(self.base_model, lambda: {id(adapter) for adapter in self.slowfast_adapters.values()})
        )
        if any(adapter.projectors is not None for adapter in self.slowfast_adapters.values()):
            for index, path in enumerate(self.family.projector_modules):
                module = self.base_model.get_submodule(path)
                self._extra_hooks.append(module.register_forward_hook(self._projector_hook(module, index)))
        self._extra_hooks += lora.base_mode_hooks(self.base_model, lambda: state.current_mode(id(self)) == "base")
        lora.activate(self.base_model, self._active_adapter)
        self._refresh_trainable()

    def _projector_hook(self, base_module: nn.Module, index: int):
        """Forward hook on the base's projector: outside `disable_adapter()`, the active adapter's copy answers.

        The copy may hold another dtype than the base (fp32 after training under mixed precision, on a bf16 base):
        its inputs are cast to the dtype it computes in (`hybrid.compute_input`) and its output to the base
        projector's output dtype, so the rest of the base sees what its own projector would give."""

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if module is not base_module or state.current_mode(id(self)) == "base":
                return None
            projectors = self.slowfast_adapters[self._active_adapter].projectors
            if projectors is None:
                return None
            copy_ = projectors[index]
            weight = next(copy_.parameters(), None)
            if weight is not None:
                args = tuple(compute_input(a, weight) if isinstance(a, torch.Tensor) else a for a in args)
            result = copy_(*args)
            if isinstance(result, torch.Tensor) and isinstance(output, torch.Tensor) and result.dtype != output.dtype:
                result = result.to(output.dtype)
            return result

        return hook

    def _remove_hooks(self) -> None:
        for hooks in (self._hooks or {}).values():
            for hook in hooks:
                hook.remove()
        for handle in self._extra_hooks:
            handle.remove()
        self._hooks, self._extra_hooks = {}, []

    def _refresh_trainable(self) -> None:
        """Only the active adapter trains (PEFT's rule), and only if it is trainable."""
        for name, adapter in self.slowfast_adapters.items():
            on = name == self._active_adapter and self._trainable.get(name, True)
            adapter.requires_grad_(on)
            for param in lora.adapter_parameters(self.base_model, name):
                param.requires_grad_(on)

    # ---------------------------------------------------------------------------------- parameters
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """An adapter's slow-fast parameters (active adapter by default), keyed as in adapter_model.safetensors:
        `slow_branches.<layer>.<name>` and, with a trained projector, `projector.<base module path>.<name>`.
        LoRA weights are in `lora_state_dict`."""
        return self.slowfast_adapters[adapter_name or self._active_adapter].state_dict_for_file(self.family)

    def lora_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """An adapter's LoRA weights keyed as PEFT saves them (`base_model.model.<path>.lora_A.weight`); {} if none."""
        name = adapter_name or self._active_adapter
        return lora.state_dict(self.base_model, name) if name in self.lora_configs else {}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def unwrap(self) -> nn.Module:
        """Remove every adapter and return the base model as it was (same modules, weights and grad flags).

        LoRA layers are replaced by the very modules they wrapped; the base's projector was never modified.
        """
        self._check_wrapped()
        self._remove_hooks()
        self.base_model.__dict__.pop(_WRAPPED_MARK, None)
        lora.unload(self.base_model)
        for name, param in self.base_model.named_parameters():
            param.requires_grad_(self._base_requires_grad.get(name, param.requires_grad))
        self._hooks = None
        return self.base_model

    def _check_wrapped(self) -> None:
        if self._hooks is None:
            raise RuntimeError("This SlowFastModel was unwrapped; wrap the base model again to use it.")

    # ------------------------------------------------------------------------------------------ IO
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
        """Write the adapters (all by default) to `save_directory`, as PEFT lays them out: "default" at the top,
        any other adapter in `save_directory/<name>/`. Each folder gets adapter_config.json,
        adapter_model.safetensors (new parameters only, in their dtype in memory: fp32 after training under mixed
        precision, as PEFT saves its adapters), `lora/` (PEFT's format) if it has LoRA, and README.md."""
        self._check_wrapped()
        names = list(self.slowfast_adapters) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.slowfast_adapters]
        if unknown or not names:
            raise ValueError(
                f"Cannot save adapters {unknown or names}: loaded adapters are {list(self.slowfast_adapters)}."
            )
        for name in names:
            folder = Path(save_directory) if name == DEFAULT_ADAPTER else Path(save_directory) / name
            adapter = self.slowfast_adapters[name]
            projectors = list(self.family.projector_modules) if adapter.projectors is not None else None
            saved_lora = None
            if name in self.lora_configs:
                saved_lora = adapter_io.SavedLora(
                    self.lora_configs[name], self.lora_state_dict(name), type(self.base_model)
                )
            contents = adapter_io.AdapterContents(
                tensors=self.adapter_state_dict(name),
                identity=adapter_io.base_identity(self.base_model, tuple(projectors or ())),
                config=self.slowfast_configs[name],
                hybrid_layers=adapter.hybrid_layer_indices,
                projector_modules=projectors,
                lora=saved_lora,
            )
            adapter_io.write_adapter(folder, contents)

    @classmethod
    def from_pretrained(
        cls,
        base_model: nn.Module,
        path_or_hub_id: str | os.PathLike,
        revision: str | None = None,
        *,
        adapter_name: str = "default",
        is_trainable: bool = False,
        token: str | None = None,
        subfolder: str | None = None,
        verify_checksums: bool = True,
    ) -> SlowFastModel:
        """Wrap `base_model` with a saved adapter, from a local folder or a Hub repo id (`revision`: Hub only).

        Refuses mismatches with `AdapterError` and leaves `base_model` untouched then. Like PEFT,
        `is_trainable=False` loads the adapter frozen (inference); pass True to keep training it. The adapter takes
        the base's dtype (a saved fp32 adapter runs in bf16 on a bf16 base), except with `is_trainable=True`, which
        keeps saved fp32 weights in fp32 (the slow branches and projector copy).
        """
        if isinstance(base_model, SlowFastModel):
            raise TypeError("The model is already a SlowFastModel; pass its base (`model.unwrap()`) instead.")
        saved = _read_for(base_model, path_or_hub_id, revision=revision, token=token, subfolder=subfolder)
        with _must_fit(saved):
            model = cls(base_model, saved.config, lora_config=_explicit_lora(saved), adapter_name=adapter_name)
        try:
            model._load_tensors(adapter_name, saved, verify_checksums=verify_checksums, keep_precision=is_trainable)
        except BaseException:
            model.unwrap()
            raise
        model.set_adapter_trainable(adapter_name, is_trainable)
        return model

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = "Upload slowfast-adapter adapter",
        create_pr: bool = False,
        selected_adapters: list[str] | None = None,
    ) -> Any:
        """Save the adapters to a temporary folder and upload it to the Hub repo `repo_id` (created if needed).

        Returns huggingface_hub's `CommitInfo`.
        """
        with tempfile.TemporaryDirectory(prefix="slowfast-adapter-push-") as tmp:
            self.save_pretrained(tmp, selected_adapters)
            return hub.push_folder(
                tmp, repo_id, private=private, token=token, revision=revision, commit_message=commit_message,
                create_pr=create_pr,
            )  # fmt: skip


def _read_for(base_model: nn.Module, path_or_hub_id: str | os.PathLike, **hub_kwargs: Any) -> adapter_io.SavedAdapter:
    """Read a saved adapter (local folder or Hub repo; `hub_kwargs` for `hub.resolve_folder`) and check it fits
    `base_model`; nothing changes yet."""
    directory, root = hub.resolve_folder_and_root(path_or_hub_id, **hub_kwargs)
    saved = adapter_io.read_adapter(directory, root=root)
    adapter_io.check_base(base_model, saved.meta, directory)
    return saved


@contextmanager
def _must_fit(saved: adapter_io.SavedAdapter) -> Iterator[None]:
    """While adding a saved adapter's modules, a `ValueError` (e.g. LoRA targets this base lacks) is an AdapterError."""
    try:
        yield
    except ValueError as err:
        raise AdapterError(f"The adapter in {saved.directory} does not fit this base model: {err}") from err


def _explicit_lora(saved: adapter_io.SavedAdapter) -> LoraConfig | None:
    """The saved `LoraConfig` when it was given explicitly at wrap time; with `lora_r` > 0 the config's own
    `lora_*` fields rebuild it (and `_load_tensors` checks that they rebuilt the saved one)."""
    return saved.lora_config if not saved.config.lora_r else None


def wrap(
    model: nn.Module, config: SlowFastConfig | None = None, *, lora_config: LoraConfig | None = None
) -> SlowFastModel:
    """Wrap a supported base model in one call: base frozen, slow-fast parameters (and LoRA, if asked) trainable."""
    return SlowFastModel(model, config, lora_config=lora_config)
