"""`SlowFastModel`: a base video MLLM with fast tokens in its sequence and slow tokens beside it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import state
from .config import SlowFastConfig
from .families import ModelFamily, PreparedInputs, family_for
from .hybrid import HybridLayerHooks, SlowBranch


class SlowFastModel(nn.Module):
    """Wraps a base model: frozen base, trainable slow-fast parameters in `slow_branches`.

    The base model's modules are not replaced: hybrid layers attach through forward pre-hooks that act
    only while one of this model's calls is running (see `hybrid.py`), and `unwrap()` removes them.
    Attributes the wrapper does not define (config, device, generation_config, ...) come from the base.
    """

    debug_reproject_slow_kv: bool = False
    """Debug/benchmark only: re-project slow K/V at every decode step (the reference's behaviour) instead of
    once per call. Same outputs, more compute; set it on an instance to measure what the cache saves."""

    def __init__(self, base_model: nn.Module, config: SlowFastConfig | None = None) -> None:
        super().__init__()
        if isinstance(base_model, SlowFastModel):
            raise TypeError("The model is already a SlowFastModel; wrap its base (`model.unwrap()`) instead.")
        config = config if config is not None else SlowFastConfig()
        family = family_for(base_model)
        layers = family.decoder_layers(base_model)
        self.base_model = base_model
        self.slowfast_config = config
        self.family: ModelFamily = family
        self.hybrid_layer_indices = config.resolve_hybrid_layers(len(layers))
        text = family.text_config(base_model)
        branches = {}
        for idx in self.hybrid_layer_indices:
            attn = layers[idx].self_attn
            weight = attn.k_proj.weight
            branch = SlowBranch(
                hidden_size=text.hidden_size,
                num_heads=text.num_attention_heads,
                num_kv_heads=text.num_attention_heads // attn.num_key_value_groups,
                head_dim=attn.head_dim,
                gate=config.gate,
                device=weight.device,
                dtype=weight.dtype,
            )
            if config.kv_init == "from_llm":
                branch.init_kv_from(attn.k_proj, attn.v_proj)
            branches[str(idx)] = branch
        self.slow_branches = nn.ModuleDict(branches)
        self._base_requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
        base_model.requires_grad_(False)
        self._hooks = [
            HybridLayerHooks(
                owner=id(self),
                layer_idx=idx,
                decoder_layer=layers[idx],
                branch=self.slow_branches[str(idx)],
                query_rope=config.query_rope,
                query_states=family.query_states,
                rope=family.rope,
            )
            for idx in self.hybrid_layer_indices
        ]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ----------------------------------------------------------------------------------------- calls
    def prepare_inputs(self, **inputs: Any) -> PreparedInputs:
        """The base-model inputs this wrapper runs: fast tokens in the sequence, slow tokens beside it."""
        self._check_wrapped()
        return self.family.prepare(self.base_model, self.slowfast_config, inputs)

    def forward(self, input_ids: torch.Tensor | None = None, **inputs: Any) -> Any:
        """Same arguments as the base model's forward (the stock processor's output, labels, ...).

        The returned logits cover the fitted sequence (`prepare_inputs(...).input_ids`), which holds
        the fast tokens instead of the native video tokens; labels are fitted the same way.
        """
        mode = state.current_mode(id(self))
        if mode == "base":
            with state.activated(None):
                return self.base_model(input_ids=input_ids, **inputs)
        prepared = self.prepare_inputs(input_ids=input_ids, **inputs)
        with state.activated(self._slow_context(prepared) if mode == "slowfast" else None):
            return self.base_model(**prepared.model_inputs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, **inputs: Any) -> Any:
        """The base model's `generate`, with the slow path active at every step.

        Slow K/V are projected once per call and reused at every decode step. The returned sequences
        start with the caller's own `input_ids` (native placeholder count), followed by the new tokens,
        so `output[:, input_ids.shape[1]:]` is the answer as with the base model.
        """
        mode = state.current_mode(id(self))
        if mode == "base":
            with state.activated(None):
                return self.base_model.generate(input_ids=input_ids, **inputs)
        prepared = self.prepare_inputs(input_ids=input_ids, **inputs)
        with state.activated(self._slow_context(prepared) if mode == "slowfast" else None):
            output = self.base_model.generate(**prepared.model_inputs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        new_tokens = sequences[:, prepared.input_ids.shape[1] :]
        prompt = input_ids.to(sequences.device).repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompt, new_tokens], dim=-1)
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        return output

    def _slow_context(self, prepared: PreparedInputs) -> state.SlowContext | None:
        if prepared.slow is None:  # no visual input in the batch: exactly the base model
            return None
        visual = prepared.visual_mask
        which = self.slowfast_config.query_tokens
        if which == "text":
            queries = ~visual
        elif which == "text_after_first_video":
            queries = ~visual & (visual.long().cumsum(-1) > 0)
        else:
            queries = torch.ones_like(visual)
        attention_mask = prepared.model_inputs.get("attention_mask")
        if attention_mask is not None:
            queries = queries & attention_mask.bool()
        context = state.SlowContext(
            owner=id(self),
            slow=prepared.slow,
            prompt_query_mask=queries,
            reproject_slow_kv=self.debug_reproject_slow_kv,
        )
        if not context.reproject_slow_kv:
            # Project every hybrid layer's slow K/V now, once per call and outside any checkpointed layer.
            for hooks in self._hooks:
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
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=checkpoint_kwargs, **kwargs)
        else:  # transformers releases before activation_checkpointing_enable
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs, **kwargs)

    activation_checkpointing_enable = gradient_checkpointing_enable

    # ------------------------------------------------------------------------------------ ablations
    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block (this thread), calls run the untouched base model: native video tokens."""
        with state.mode(id(self), "base"):
            yield

    @contextmanager
    def slow_path_disabled(self) -> Iterator[None]:
        """Within the block (this thread), calls use fast tokens only, without cross-attention."""
        with state.mode(id(self), "fast_only"):
            yield

    # ---------------------------------------------------------------------------------- parameters
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The new parameters only, keyed `slow_branches.<layer>.<name>`."""
        return {f"slow_branches.{k}": v for k, v in self.slow_branches.state_dict().items()}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def unwrap(self) -> nn.Module:
        """Remove the adapter and return the base model as it was (same modules, weights and grad flags)."""
        self._check_wrapped()
        for hooks in self._hooks:
            hooks.remove()
        for name, param in self.base_model.named_parameters():
            param.requires_grad_(self._base_requires_grad.get(name, param.requires_grad))
        self._hooks = None
        return self.base_model

    def _check_wrapped(self) -> None:
        if self._hooks is None:
            raise RuntimeError("This SlowFastModel was unwrapped; wrap the base model again to use it.")

    # ------------------------------------------------------------------------------------------ IO
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the adapter (new parameters, config, base identity) to `save_directory`."""
        from .adapter_io import save_adapter

        save_adapter(self, save_directory)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, adapter_directory: str | os.PathLike) -> SlowFastModel:
        """Wrap `base_model` and load an adapter saved with `save_pretrained`; refuses mismatches."""
        from .adapter_io import load_adapter

        return load_adapter(base_model, adapter_directory)


def wrap(model: nn.Module, config: SlowFastConfig | None = None) -> SlowFastModel:
    """Wrap a supported base model in one call: base frozen, slow-fast parameters trainable."""
    return SlowFastModel(model, config)
