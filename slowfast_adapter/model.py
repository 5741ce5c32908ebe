"""`SlowFastModel`: a base video MLLM with fast tokens in its sequence and slow tokens beside it.

The wrapper itself: `forward`/`generate` and the lifecycle of the hooks that attach the hybrid layers. Adapters are
`adapters.AdapterRegistry`, saving and loading `save_and_load.py`, encode-once reuse `encoded.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapters import AdapterRegistry, projector_hooks
from .config import SlowFastConfig
from .core import encoded as reuse
from .core import frame_attention, inspection, lora, state, surface
from .core.encoded import EncodedVideos
from .core.hybrid import HybridLayerHooks, register_step_hook
from .core.types import PreparedInputs, SlowTokens
from .families import ModelFamily, family_for
from .io.save_and_load import PretrainedIO

if TYPE_CHECKING:
    from peft import LoraConfig


_WRAPPED_MARK = "_slowfast_adapter_wrapped"
"""Set on a base model's __dict__ while a SlowFastModel wraps it (removed by `unwrap`)."""


class SlowFastModel(AdapterRegistry, PretrainedIO, nn.Module):
    """Wraps a base model: frozen base, trainable slow-fast parameters in named adapters (`AdapterRegistry`), saved
    and loaded as PEFT-like folders (`PretrainedIO`).

    The base model's modules are not replaced (except by PEFT's LoRA layers, when LoRA is configured): hybrid
    layers attach through forward pre-hooks that act only while one of this model's calls is running (see
    `hybrid.py`), and `unwrap()` removes them. Attributes the wrapper does not define (config, device,
    generation_config, ...) come from the base.
    """

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
        self._init_registry(adapter_name)
        self._base_requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
        self._hooks: dict[str, list[HybridLayerHooks]] | None = {}
        self._extra_hooks: list[torch.utils.hooks.RemovableHandle] = []  # projector and LoRA base-mode hooks
        base_model.requires_grad_(False)
        try:
            self.add_adapter(adapter_name, config, lora_config=lora_config)
        except BaseException:
            self.unwrap()
            raise

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
            encoded.check_owner(id(self), self.projector_adapter)
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
        context = self.slow_context(prepared, encoded, looks=True) if mode == "slowfast" else None
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
        context = self.slow_context(prepared, encoded, looks=True) if mode == "slowfast" else None
        model_inputs = reuse.generate_inputs(self, prepared, encoded, context)
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
        return reuse.encode(self, inputs, into)

    def slow_context(
        self,
        prepared: PreparedInputs,
        encoded: EncodedVideos | None = None,
        *,
        store_kv: bool = False,
        looks: bool = False,
    ) -> state.SlowContext | None:
        """The slow context of a call on `prepared` inputs (None without slow tokens): the prompt tokens that
        query (`SlowFastConfig.query_tokens`, padding left out) and every hybrid layer's slow K/V. `looks`: a
        forward/generate call, which records its per-frame maps inside `frame_attention.looking(self)`."""
        if prepared.slow is None:  # no visual input in the batch: exactly the base model
            return None
        queries = state.prompt_query_mask(prepared.visual_mask, self.slowfast_config.query_tokens)
        attention_mask = prepared.model_inputs.get("attention_mask")
        if attention_mask is not None:
            queries = queries & attention_mask.bool()
        context = self.slow_context_for_tokens(
            prepared.slow, queries, reproject_slow_kv=inspection.reprojects(self), encoded=encoded, store_kv=store_kv
        )
        if looks:
            frame_attention.attach(self, context, prepared.input_ids, attention_mask)
        return context

    def slow_context_for_tokens(
        self,
        slow: SlowTokens,
        prompt_query_mask: torch.Tensor,
        *,
        reproject_slow_kv: bool = False,
        encoded: EncodedVideos | None = None,
        store_kv: bool = False,
    ) -> state.SlowContext:
        """The per-call state of the active adapter for `slow` tokens (activate it with `state.activated`).

        prompt_query_mask: [B, L0] bool, the prompt tokens that query the slow tokens. Unless
        `reproject_slow_kv`, every hybrid layer's slow K/V are projected here, once per call and outside any
        checkpointed layer. Used by `slow_context`, `encode` and the FLOP counter. encoded: K/V of videos
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

    # ----------------------------------------------------------------------------------------- hooks
    def _install_hooks(self) -> None:
        """Re-install every hook on the modules that are called now (LoRA layers may have replaced linears)."""
        self._remove_hooks()
        layers = self.family.decoder_layers(self.base_model)
        for name, adapter in self.slowfast_adapters.items():
            self._hooks[name] = adapter.attach(layers, self.family, self.slowfast_configs[name])
        self._extra_hooks = [
            register_step_hook(self.base_model, lambda: {id(adapter) for adapter in self.slowfast_adapters.values()}),
            *projector_hooks(self),
            *lora.base_mode_hooks(self.base_model, lambda: state.current_mode(id(self)) == "base"),
        ]
        lora.activate(self.base_model, self._active_adapter)
        self._refresh_trainable()

    def _remove_hooks(self) -> None:
        for hooks in (self._hooks or {}).values():
            for hook in hooks:
                hook.remove()
        for handle in self._extra_hooks:
            handle.remove()
        self._hooks, self._extra_hooks = {}, []

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


def wrap(
    model: nn.Module, config: SlowFastConfig | None = None, *, lora_config: LoraConfig | None = None
) -> SlowFastModel:
    """Wrap a supported base model in one call: base frozen, slow-fast parameters (and LoRA, if asked) trainable."""
    return SlowFastModel(model, config, lora_config=lora_config)
