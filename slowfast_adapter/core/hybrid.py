"""Hybrid decoder layers: gated cross-attention of query tokens over the slow tokens.

`SlowBranch` holds one hybrid layer's new parameters; `HybridLayerHooks` attaches it to an unchanged decoder layer
with two forward pre-hooks (on `self_attn` and `o_proj`) that act only inside this model's calls. Design notes
(the gate, sharding engines): docs/internals.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = None

from . import surface
from .attention import kernel_for, slow_cross_attention
from .state import SlowContext, active_context, current_context
from .types import SlowItem


def _autocast_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """autocast's dtype where autocast is on for `weight`'s device, else None."""
    device = weight.device.type
    if device in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer holding `weight` computes in: autocast's where autocast is on for the weight's
    device (an fp32 adapter trained under bf16 mixed precision computes in bf16), else the weight's own (the same
    adapter used for inference on a bf16 base without autocast computes in fp32; its result is cast back)."""
    return _autocast_dtype(weight) or weight.dtype


def compute_input(tensor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A floating `tensor` going into a module holding `weight`: cast to the weight's dtype without autocast; under
    autocast left as it is, for autocast to cast per op (an up-cast to an fp32 adapter's dtype would only copy it)."""
    if not tensor.is_floating_point() or _autocast_dtype(weight) is not None:
        return tensor
    return tensor.to(weight.dtype)


KV_CHUNK_TOKENS = 16384
"""Slow tokens projected to K/V per `kv_proj` call (bounds the temporaries on long videos)."""


class SlowBranch(nn.Module):
    """The trainable parameters of one hybrid layer.

    kv_proj: hidden -> 2 * kv_heads * head_dim (K then V, heads in the LLM's own order), with bias.
    gate_proj: self-attention output (heads * head_dim) -> 1, for the dynamic gate.
    attn_gate: the scalar alpha, initialised to 0 so the gate starts exactly closed.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        gate: str = "dynamic_tanh",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.kv_proj = nn.Linear(hidden_size, 2 * num_kv_heads * head_dim, bias=True, device=device, dtype=dtype)
        self.gate_proj = (
            nn.Linear(num_heads * head_dim, 1, device=device, dtype=dtype) if gate == "dynamic_tanh" else None
        )
        self.attn_gate = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    @torch.no_grad()
    def init_kv_from(self, k_proj: nn.Linear, v_proj: nn.Linear) -> None:
        """Copy the LLM's k_proj / v_proj into kv_proj (missing biases become zeros)."""
        width = k_proj.out_features
        self.kv_proj.weight[:width].copy_(k_proj.weight)
        self.kv_proj.weight[width:].copy_(v_proj.weight)
        for bias, source in ((self.kv_proj.bias[:width], k_proj.bias), (self.kv_proj.bias[width:], v_proj.bias)):
            bias.copy_(source) if source is not None else bias.zero_()

    def project_tokens(self, normed_slow: torch.Tensor) -> torch.Tensor:
        """normed_slow [..., S, D] -> K then V [..., S, 2 * H_kv * hd]. No positional encoding here (the hooks
        rotate the keys when `SlowFastConfig.slow_key_positions` asks for it)."""
        return self.kv_proj(compute_input(normed_slow, self.kv_proj.weight))

    def project_slow(self, normed_slow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """normed_slow [B, S, D] -> key, value [B, H_kv, S, hd]."""
        kv = self.project_tokens(normed_slow)
        key, value = rearrange(kv, "b s (two h d) -> two b h s d", two=2, d=self.head_dim)
        return key, value

    def forward(self, attn_output: torch.Tensor) -> torch.Tensor:
        """The gate: attn_output [B, L, heads * hd] (before o_proj) -> gate [B, L, 1].

        `attn_gate` is read only here, inside a call of this module, where sharding engines have gathered it
        (see the module docstring); call the module (or `gate`), never read `attn_gate` from a hook."""
        alpha = torch.tanh(self.attn_gate)
        if self.gate_proj is None:
            return alpha.expand(*attn_output.shape[:-1], 1)
        # `.dtype` of a sharded parameter is its true dtype even where its data is an empty shard
        return torch.tanh(self.gate_proj(compute_input(attn_output, self.gate_proj.weight))) * alpha

    def gate(self, attn_output: torch.Tensor) -> torch.Tensor:
        """attn_output [B, L, heads * hd] (before o_proj) -> gate [B, L, 1], through a call of this module."""
        return self(attn_output)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """query [B, H, L, hd]; cos, sin [B, L, hd] (the layer's `position_embeddings`)."""
    cos, sin = cos[:, None], sin[:, None]
    return query * cos + rotate_half(query) * sin


def default_query_states(attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The layer's own query projection: hidden [B, L, D] -> [B, H, L, hd] (q_norm applied if present)."""
    q_proj, head_dim = (surface.attention_attribute(attn, name) for name in ("q_proj", "head_dim"))
    query = q_proj(hidden).view(*hidden.shape[:-1], -1, head_dim)
    q_norm = surface.query_norm(attn)
    if q_norm is not None:
        query = q_norm(query)
    return query.transpose(1, 2)


def unsharded(module: nn.Module) -> Callable[..., torch.Tensor]:
    """`module` as a callable whose parameters that FSDP2 holds sharded (DTensors) are gathered, once, here.

    FSDP2 unshards a unit's parameters only around the forward of the module it wrapped; a submodule called
    from elsewhere (here: a decoder layer's norm, before the decoder runs) would see DTensor shards. Gathering
    is collective: it happens once per call of this function (not per chunk of tokens), so ranks whose batches
    hold different numbers of slow tokens still make the same collective calls."""
    sharded = {name: p for name, p in module.named_parameters() if DTensor is not None and isinstance(p, DTensor)}
    if not sharded:
        return module
    whole = {name: p.full_tensor() for name, p in sharded.items()}
    return lambda *args: torch.func.functional_call(module, whole, args)


def _token_chunks(items: list[SlowItem], size: int) -> Iterator[list[tuple[int, int, int]]]:
    """The tokens of `items` in order, cut into chunks of at most `size` tokens: each chunk a list of pieces
    (row, start, length), an item's tokens split where a chunk ends."""
    chunk, room = [], size
    for item in items:
        start, left = item.start, item.length
        while left:
            take = min(left, room)
            chunk.append((item.row, start, take))
            start, left, room = start + take, left - take, room - take
            if not room:
                yield chunk
                chunk, room = [], size
    if chunk:
        yield chunk


def _gather_tokens(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor [B, L, X], index [B, K] -> [B, K, X]."""
    return tensor.gather(1, index[..., None].expand(-1, -1, tensor.shape[-1]))


class HybridLayerHooks:
    """Attaches a `SlowBranch` to one decoder layer of the base model (see the module docstring)."""

    def __init__(
        self,
        *,
        owner: int,
        layer_idx: int,
        decoder_layer: nn.Module,
        branch: SlowBranch,
        query_rope: bool,
        query_states: Callable[[nn.Module, torch.Tensor], torch.Tensor] = default_query_states,
        rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = apply_rope,
    ) -> None:
        self.owner, self.layer_idx, self.branch = owner, layer_idx, branch
        self.attn = surface.self_attention(decoder_layer)
        self.norm = surface.input_norm(decoder_layer)
        self.scaling = surface.attention_attribute(self.attn, "scaling")
        surface.attention_implementation(self.attn)  # checked now; read at every call (users may switch it)
        self.query_rope, self.query_states, self.rope = query_rope, query_states, rope
        self.handles = [
            self.attn.register_forward_pre_hook(self.before_attention, with_kwargs=True),
            surface.attention_attribute(self.attn, "o_proj").register_forward_pre_hook(self.before_o_proj),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def slow_kv(self, context: SlowContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The slow K/V [B, H_kv, S, hd] of this layer for the active call, each contiguous (the layout SDPA reads
        fastest, and the one a compiled step need not copy), projected on first use and then cached for the call."""
        if context.reproject_slow_kv or self.layer_idx not in context.slow_kv:
            key, value = self._project_items(context)
            if context.slow.key_rope is not None:  # slow_key_positions="temporal": RoPE at each key's frame time
                cos, sin = (t.to(device=key.device, dtype=key.dtype) for t in context.slow.key_rope)
                key = self.rope(key, cos, sin)
            if context.reproject_slow_kv:  # debug: no cache, as the reference does at every decode step
                return key, value
            context.slow_kv[self.layer_idx] = (key, value)
        return context.slow_kv[self.layer_idx]

    def _project_items(self, context: SlowContext) -> tuple[torch.Tensor, torch.Tensor]:
        """key, value [B, H_kv, S, hd]: the slow tokens normalised by the layer's own `input_layernorm` and
        projected, videos taken from `context.encoded` where it holds their K/V; the rest projected here."""
        slow, encoded = context.slow, context.encoded
        kv_proj, head_dim = self.branch.kv_proj, self.branch.head_dim
        parameters = [p for p in (kv_proj.weight, kv_proj.bias, getattr(self.norm, "weight", None)) if p is not None]
        batch, length = slow.tokens.shape[:2]
        # in kv_proj's output dtype: bf16 under autocast even for an fp32 adapter (no fp32 copy of the K/V is kept)
        shape = (batch, kv_proj.out_features // (2 * head_dim), length, head_dim)
        key, value = (slow.tokens.new_zeros(shape, dtype=compute_dtype(kv_proj.weight)) for _ in range(2))
        cached: set[int] = set()
        if encoded is not None:
            for i, item in enumerate(slow.items):
                part = encoded.cached_kv((context.owner, self.layer_idx, item.key), parameters) if item.key else None
                if part is not None:
                    cached.add(i)
                    for whole, piece in zip((key, value), part, strict=True):
                        whole[item.row, :, item.start : item.start + item.length] = piece
        todo = [item for i, item in enumerate(slow.items) if i not in cached]
        if todo:
            context.counters.kv_projection()
            self._project_into(key, value, slow.tokens, todo)
            if encoded is not None and context.store_kv:
                for item in todo:
                    if item.key:
                        part = tuple(t[item.row, :, item.start : item.start + item.length] for t in (key, value))
                        encoded.store_kv((context.owner, self.layer_idx, item.key), part, parameters)
        return key, value

    def _project_into(
        self, key: torch.Tensor, value: torch.Tensor, tokens: torch.Tensor, items: list[SlowItem]
    ) -> None:
        """key[b, :, s], value[b, :, s] = kv_proj(norm(tokens[b, s])) for every slow token of `items`,
        KV_CHUNK_TOKENS tokens per call, so the normalised tokens are never held all at once (long videos). Tokens
        are read and written as slices (a scattered index_put into the per-head layout is ~3x slower on the CPU)."""
        norm = unsharded(self.norm)
        for pieces in _token_chunks(items, KV_CHUNK_TOKENS):
            normed = norm(torch.cat([tokens[row, start : start + length] for row, start, length in pieces]))  # [n, D]
            kv = self.branch.project_tokens(normed)  # [n, 2 * H_kv * hd]
            k, v = rearrange(kv, "n (two h d) -> two h n d", two=2, d=self.branch.head_dim)
            offset = 0
            for row, start, length in pieces:
                key[row, :, start : start + length] = k[:, offset : offset + length]
                value[row, :, start : start + length] = v[:, offset : offset + length]
                offset += length

    def before_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        context = active_context(self.owner)
        if context is None:
            return None
        hidden = surface.attention_hidden_states(args, kwargs)  # [B, L, D]
        batch, length = hidden.shape[:2]
        plan = step_plan(context, length, batch, hidden.device)
        if plan is None:  # no token of this step queries
            return None
        context.counters.read(self.layer_idx, plan.per_row)
        # Dense steps run every token; long steps gather their query tokens (and those tokens' RoPE) first.
        pick = (lambda t: t) if plan.index is None else (lambda t: _gather_tokens(t.expand(batch, -1, -1), plan.index))
        query = self.query_states(self.attn, pick(hidden))  # [B, H, Lq, hd]
        if self.query_rope:
            cos, sin = surface.attention_rope(kwargs)
            query = self.rope(query, pick(cos), pick(sin))
        key, value = self.slow_kv(context)
        query = query.to(key.dtype)
        slow = context.slow
        mask = slow.kernel_mask
        kernel = kernel_for(surface.attention_implementation(self.attn), query)
        context.counters.kernel(kernel)
        cross = slow_cross_attention(
            query,
            key,
            value,
            None if mask is None else mask.to(key.device),
            scaling=self.scaling,
            implementation=kernel,
            packed_keys=slow.packed_keys() if kernel == "flash_attn" else None,
        )
        looks = context.frame_attention  # "where it looked" (frame_attention.py); None unless asked for
        frame_mass = None if looks is None else looks.attend(query, key, slow, scaling=self.scaling)
        context.pending[self.layer_idx] = (plan, rearrange(cross, "b h l d -> b l (h d)"), frame_mass)
        return None

    def before_o_proj(self, module: nn.Module, args: tuple) -> tuple | None:
        context = active_context(self.owner)
        if context is None or self.layer_idx not in context.pending:
            return None
        plan, cross, frame_mass = context.pending.pop(self.layer_idx)
        (attn_output,) = args  # [B, L, heads * hd], the self-attention output before o_proj
        queried = attn_output if plan.index is None else _gather_tokens(attn_output, plan.index)
        gate = self.branch.gate(queried)  # [B, Lq, 1]
        if frame_mass is not None:  # [B, Lq, F] attention mass per frame, times |gate|
            weights = frame_mass * gate.detach().abs().float()
            context.frame_attention.record(context, self.layer_idx, plan.step_positions(), plan.valid, weights)
        update = (gate * cross * plan.valid[..., None]).to(attn_output.dtype)  # [B, Lq, heads * hd]
        if plan.index is None:
            return (attn_output + update,)
        return (attn_output.scatter_add(1, plan.index[..., None].expand_as(update), update),)


DENSE_STEP_TOKENS = 8
"""Steps of at most this many tokens (decode steps, assisted decoding's candidates) run every token of the step
through the cross-attention and multiply the update by the query mask: fixed shapes and no host sync, so a decode
step compiles to one graph. Longer steps (prefill, its chunks) gather the query tokens first (one host sync per step)
so the fast visual tokens, most of a prompt, cost no cross-attention."""


@dataclass
class StepPlan:
    """Which tokens of one language-model step query the slow tokens; shared by the step's hybrid layers.

    index: [B, Lq] long, the positions in the step of the tokens that run through the cross-attention (each row's
    query tokens first, in order), or None when every token of the step runs (dense: Lq = L). valid: [B, Lq] bool,
    which of them really query (and whose sample has slow tokens); their update is kept, the others' multiplied
    by 0. per_row: [B] the query count of each row.
    """

    index: torch.Tensor | None
    valid: torch.Tensor
    per_row: torch.Tensor

    def step_positions(self) -> torch.Tensor:
        """[B, Lq] the planned tokens' positions within the step."""
        if self.index is not None:
            return self.index
        return torch.arange(self.valid.shape[1], device=self.valid.device).expand_as(self.valid)


def step_plan(context: SlowContext, length: int, batch: int, device: torch.device) -> StepPlan | None:
    """The current step's `StepPlan`, worked out once per step (None: no token queries; prefill only)."""
    if context.step_plan is not None:
        return context.step_plan
    query_mask = context.step_query_mask(length, batch).to(device)  # [B, L]
    has_slow = context.slow.has_slow.to(device)
    has_slow = has_slow.repeat_interleave(batch // has_slow.shape[0])
    if length <= DENSE_STEP_TOKENS:
        valid = query_mask & has_slow[:, None]
        plan = StepPlan(None, valid, valid.sum(-1))
    else:
        counts = query_mask.sum(-1)
        num_queries = int(counts.max())  # the one host sync of a long step
        if num_queries == 0:
            return None
        # Query tokens first (stable), so each row's queries are its first `counts[b]` entries.
        index = torch.argsort((~query_mask).to(torch.int8), dim=-1, stable=True)[:, :num_queries]  # [B, Lq]
        valid = (torch.arange(num_queries, device=device) < counts[:, None]) & has_slow[:, None]
        plan = StepPlan(index, valid, counts * has_slow)
    context.step_plan = plan
    return plan


def register_step_hook(model: nn.Module, owners: Callable[[], set[int]]) -> torch.utils.hooks.RemovableHandle:
    """A pre-hook on the base's language model that announces each forward step to the active slow context.

    It records where the step starts in the sequence (the tokens already in its KV cache, 0 without one)
    and how many tokens it runs, so the hybrid layers know which tokens are prompt tokens and which are
    generated, whatever keyword transformers uses for the cache. `owners()`: the ids this model's
    contexts carry (one per adapter).
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        context = current_context()
        if context is not None and context.owner in owners():
            context.begin_step(*surface.language_model_step(args, kwargs))

    return surface.language_model(model).register_forward_pre_hook(hook, with_kwargs=True)
