"""Non-causal cross-attention of query tokens over slow tokens (GQA, key padding, no K/V copies).

Two kernels, equal up to rounding:
- "sdpa": `F.scaled_dot_product_attention`. On the CPU with a boolean key mask it runs torch's fused
  flash kernel, which is already blocked over the keys (no [L_q, S] score matrix in memory), and it is
  faster than our explicit chunked loop below (benchmarks/results/hybrid_scaling.md: the queries part
  at 98k slow tokens takes 1.1 s with sdpa vs 3.2 s eager). So it is not chunked here.
- "eager": plain matmuls and softmax, chunked over the slow tokens with an online softmax
  (log-sum-exp merge), so memory is bounded by `chunk_size` keys whatever the number of slow tokens.

The eager kernel can also sum its attention weights by groups of keys (`key_groups`: a video's frames), in the
same pass and with the same softmax: `slow_attention_mass` ("where it looked", `frame_attention.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

DEFAULT_CHUNK_SIZE = 4096
"""Slow tokens per step of the eager kernel: scores of [.., L_q, chunk_size] at a time."""


def slow_cross_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor,
    *,
    scaling: float,
    implementation: str = "sdpa",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Attend queries to the slow tokens of their own sample.

    query: [B_q, H, L_q, hd]; key, value: [B_k, H_kv, S, hd]; key_padding_mask: [B_k, S] (True = attend).
    B_q may be a multiple n of B_k (beam search / several returned sequences): query rows
    b*n .. b*n+n-1 belong to slow sample b, as `repeat_interleave` lays them out.
    chunk_size: slow tokens per step of the eager kernel (ignored by sdpa, see the module docstring).
    Returns [B_q, H, L_q, hd].

    GQA and the batch expansion are folded into the query length ([B_k, H_kv, n*G*L_q, hd]), so the
    slow K/V are never repeated in memory; this is exact because every query row attends to the same
    keys regardless of the others (no causal mask). Every mask row needs at least one True.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    folded, unfold = _fold_queries(query, key)
    if implementation == "eager":
        out = chunked_eager_attention(folded, key, value, key_padding_mask, scaling=scaling, chunk_size=chunk_size)
    else:  # sdpa; flash-attention base models also run this branch through SDPA's fused kernels
        mask = key_padding_mask[:, None, None, :]  # [B_k, 1, 1, S]
        out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return unfold(out)


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
    key_padding_mask: torch.Tensor,
    *,
    scaling: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    key_groups: tuple[torch.Tensor, int] | None = None,
):
    """softmax(q k^T * scaling, masked) v, over the keys in chunks merged with an online softmax.

    query: [B, H, M, hd]; key, value: [B, H, S, hd]; key_padding_mask: [B, S] (True = attend, at least
    one per row). Returns [B, H, M, hd] in the query's dtype. Scores, running max and sum are float32
    (or float64 for float64 inputs); peak extra memory is O(B * H * M * chunk_size), not O(.. * S).

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
        scores = scores.to(stats_dtype).masked_fill(~key_padding_mask[:, None, None, start:stop], lowest)
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
