"""Non-causal cross-attention of query tokens over slow tokens (GQA, key padding, no K/V copies).

Kernels "sdpa", "eager" (chunked, online softmax; also sums attention mass per frame) and "flash_attn", equal up to
rounding; `kernel_for` picks one per call site. Why sdpa is not chunked: docs/internals.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from .types import PackedKeys

DEFAULT_CHUNK_SIZE = 4096
"""Slow tokens per step of the eager kernel: scores of [.., L_q, chunk_size] at a time."""


def slow_cross_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    *,
    scaling: float,
    implementation: str = "sdpa",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    packed_keys: PackedKeys | None = None,
) -> torch.Tensor:
    """Attend queries to the slow tokens of their own sample.

    query: [B_q, H, L_q, hd]; key, value: [B_k, H_kv, S, hd]; key_padding_mask: [B_k, S] (True = attend, each
    row's real keys first), or None when every key of every row is real (no mask reaches the kernel, so SDPA may
    pick its flash kernel). B_q may be a multiple n of B_k (beam search / several returned sequences): query rows
    b*n .. b*n+n-1 belong to slow sample b, as `repeat_interleave` lays them out.
    implementation: the base's attention implementation; `kernel_for` says which kernel runs for it (or pass
    a kernel name `kernel_for` returns: "eager", "sdpa", "flash_attn").
    chunk_size: slow tokens per step of the eager kernel (ignored by the others, see the module docstring).
    packed_keys: where the real keys sit (flash-attn's varlen kernel, for padded rows; see `PackedKeys`).
    Returns [B_q, H, L_q, hd].

    GQA and the batch expansion are folded into the query length ([B_k, H_kv, n*G*L_q, hd]), so the
    slow K/V are never repeated in memory; this is exact because every query row attends to the same
    keys regardless of the others (no causal mask). Every mask row needs at least one True.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    folded, unfold = _fold_queries(query, key)
    kernel = implementation if implementation in KERNELS else kernel_for(implementation, folded)
    if kernel == "eager":
        out = chunked_eager_attention(folded, key, value, key_padding_mask, scaling=scaling, chunk_size=chunk_size)
    elif kernel == "flash_attn":
        if key_padding_mask is not None and packed_keys is None:
            packed_keys = PackedKeys.from_mask(key_padding_mask)
        out = _flash_attention(folded, key, value, None if key_padding_mask is None else packed_keys, scaling=scaling)
    else:  # SDPA: a boolean [B, 1, 1, S] mask is what its memory-efficient and cuDNN kernels take; none -> flash too
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return unfold(out)


try:  # resolved once, at import: a traced (compiled) step must not import
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    _FLASH_ATTN: tuple[Callable, Callable] | None = (flash_attn_func, flash_attn_varlen_func)
except Exception:  # noqa: BLE001 - not installed, or a build that does not load here: SDPA runs instead
    _FLASH_ATTN = None


KERNELS = ("eager", "sdpa", "flash_attn")


def kernel_for(implementation: str, query: torch.Tensor) -> str:
    """The kernel the cross-attention runs for a base attention `implementation` on `query`'s device and dtype:
    "eager" (the chunked kernel below) for an eager base; "flash_attn" for a flash-attention base where flash-attn
    is installed and the query is a CUDA fp16/bf16 tensor; "sdpa" otherwise (SDPA picks its own fused kernel)."""
    if implementation == "eager":
        return "eager"
    if (
        implementation.startswith("flash_attention")
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and _FLASH_ATTN is not None
    ):
        return "flash_attn"
    return "sdpa"


def _flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    packed_keys: PackedKeys | None,
    *,
    scaling: float,
    functions: tuple[Callable, Callable] | None = None,
) -> torch.Tensor:
    """flash-attn over folded queries [B, H, M, hd] and keys [B, H, S, hd] -> [B, H, M, hd]: the plain kernel when
    no row is padded (`packed_keys` None), else the varlen kernel over each row's real keys.
    functions: (`flash_attn_func`, `flash_attn_varlen_func`), flash-attn's by default (tests pass stand-ins)."""
    dense, varlen = functions or _FLASH_ATTN
    q, k, v = (rearrange(t, "b h s d -> b s h d") for t in (query, key, value))
    if packed_keys is None:
        return rearrange(dense(q, k, v, softmax_scale=scaling, causal=False), "b m h d -> b h m d")
    batch, queries = q.shape[:2]
    lengths, index = (t.to(k.device) for t in packed_keys)
    rows, positions = index // k.shape[1], index % k.shape[1]  # long indices, no host sync, no copy of all K/V
    cu_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # [B + 1]
    cu_q = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * queries
    out = varlen(
        q.reshape(batch * queries, *q.shape[2:]),
        k[rows, positions],  # [N, H, hd]: the real keys, packed
        v[rows, positions],
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=queries,
        max_seqlen_k=k.shape[1],
        softmax_scale=scaling,
        causal=False,
    )  # [B * M, H, hd]
    return rearrange(out, "(b m) h d -> b h m d", b=batch)


def slow_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    key_padding_mask: torch.Tensor,
    key_groups: torch.Tensor,
    num_groups: int,
    *,
    scaling: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """How much attention each query puts on each group of slow tokens (e.g. each frame of a video).

    query: [B_q, H, L_q, hd]; key: [B_k, H_kv, S, hd]; key_padding_mask: [B_k, S] (True = attend); key_groups:
    [B_k, S] long, the group of each key in 0 .. num_groups - 1, or -1 for keys in no group (their weight is
    dropped). Returns float32 (float64 for float64 inputs) [B_q, H, L_q, num_groups]: the softmax weights of the
    same attention `slow_cross_attention` computes, summed per group (rows sum to 1 when every key is grouped).
    Runs the eager kernel (`chunked_eager_attention`) without values: memory O(chunk_size), not O(S).
    """
    if num_groups < 0:
        raise ValueError(f"num_groups must be >= 0, got {num_groups}.")
    folded, unfold = _fold_queries(query, key)
    buckets = torch.where(key_groups < 0, num_groups, key_groups)  # ungrouped keys go to a dropped extra bucket
    _, mass = chunked_eager_attention(
        folded,
        key,
        None,
        key_padding_mask,
        scaling=scaling,
        chunk_size=chunk_size,
        key_groups=(buckets, num_groups + 1),
    )
    return unfold(mass[..., :num_groups])


def _fold_queries(query: torch.Tensor, key: torch.Tensor):
    """Fold GQA groups and repeated batch rows into the query length: [B_q, H, L_q, hd] -> [B_k, H_kv, n*G*L_q, hd]
    (query rows b*n .. b*n+n-1 belong to slow sample b). Returns the folded query and the inverse for outputs."""
    batch_q, num_heads, query_len, _ = query.shape
    batch_k, num_kv_heads = key.shape[:2]
    if batch_q % batch_k or num_heads % num_kv_heads:
        raise ValueError(
            f"query batch/heads ({batch_q}, {num_heads}) are not multiples of slow batch/heads ({batch_k}, "
            f"{num_kv_heads})."
        )
    repeats, groups = batch_q // batch_k, num_heads // num_kv_heads
    folded = rearrange(query, "(b n) (h g) l d -> b h (n g l) d", n=repeats, g=groups)
    return folded, lambda out: rearrange(out, "b h (n g l) d -> (b n) (h g) l d", n=repeats, g=groups, l=query_len)


def chunked_eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    *,
    scaling: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    key_groups: tuple[torch.Tensor, int] | None = None,
):
    """softmax(q k^T * scaling, masked) v, over the keys in chunks merged with an online softmax.

    query: [B, H, M, hd]; key, value: [B, H, S, hd]; key_padding_mask: [B, S] (True = attend, at least
    one per row), or None: every key is real. Returns [B, H, M, hd] in the query's dtype. Scores, running max and
    sum are float32 (or float64 for float64 inputs); peak extra memory is O(B * H * M * chunk_size), not O(.. * S).

    With one chunk this is the plain softmax: masked scores are set to the dtype's lowest value, so
    they get weight exactly 0 once a real key has been seen; a chunk with no real key so far only adds
    weight that the next real key's rescaling factor exp(min - max) = 0 wipes out.

    key_groups: (groups [B, S] long in 0 .. G - 1, G): also return the softmax weights summed per group,
    [B, H, M, G] in the statistics dtype, accumulated chunk by chunk like the output. Then `value` may be None
    (weights only) and the result is `(out or None, group_weights)`.
    """
    if value is None and key_groups is None:
        raise ValueError("chunked_eager_attention needs a value, key_groups, or both.")
    stats_dtype = torch.promote_types(query.dtype, torch.float32)
    lowest = torch.finfo(stats_dtype).min
    running_max = running_sum = acc = mass = None
    for start in range(0, key.shape[-2], chunk_size):
        stop = start + chunk_size
        scores = torch.matmul(query, key[..., start:stop, :].transpose(-1, -2)) * scaling  # [B, H, M, c]
        scores = scores.to(stats_dtype)
        if key_padding_mask is not None:
            scores = scores.masked_fill(~key_padding_mask[:, None, None, start:stop], lowest)
        chunk_max = scores.amax(dim=-1, keepdim=True)
        new_max = chunk_max if running_max is None else torch.maximum(running_max, chunk_max)
        probs = torch.exp(scores - new_max)  # [B, H, M, c], unnormalised
        chunk_out = None if value is None else torch.matmul(probs.to(value.dtype), value[..., start:stop, :])
        chunk_mass = None if key_groups is None else _sum_by_group(probs, key_groups, start, stop)  # [B, H, M, G]
        rescale = None if running_max is None else torch.exp(running_max - new_max)
        running_sum = _merge(running_sum, probs.sum(dim=-1, keepdim=True), rescale)
        acc = None if chunk_out is None else _merge(acc, chunk_out.to(stats_dtype), rescale)
        mass = None if chunk_mass is None else _merge(mass, chunk_mass, rescale)
        running_max = new_max
    out = None if acc is None else (acc / running_sum).to(query.dtype)
    return out if key_groups is None else (out, mass / running_sum)


def _merge(total: torch.Tensor | None, chunk: torch.Tensor, rescale: torch.Tensor | None) -> torch.Tensor:
    """The online-softmax update: the running total rescaled to the new maximum, plus this chunk's part."""
    return chunk if total is None else total * rescale + chunk


def _sum_by_group(probs: torch.Tensor, key_groups: tuple[torch.Tensor, int], start: int, stop: int) -> torch.Tensor:
    """probs [B, H, M, c] of keys start .. stop - 1 summed by their group: [B, H, M, G]."""
    groups, num_groups = key_groups
    index = groups[:, None, None, start:stop].expand_as(probs)
    return probs.new_zeros(*probs.shape[:-1], num_groups).scatter_add_(-1, index, probs)
