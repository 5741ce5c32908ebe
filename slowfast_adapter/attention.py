"""Non-causal cross-attention of query tokens over slow tokens (GQA, key padding, no K/V copies).

Two kernels, equal up to rounding:
- "sdpa": `F.scaled_dot_product_attention`. On the CPU with a boolean key mask it runs torch's fused
  flash kernel, which is already blocked over the keys (no [L_q, S] score matrix in memory), and it is
  faster than our explicit chunked loop below (benchmarks/results/hybrid_scaling.md: the queries part
  at 98k slow tokens takes 1.1 s with sdpa vs 3.2 s eager). So it is not chunked here.
- "eager": plain matmuls and softmax, chunked over the slow tokens with an online softmax
  (log-sum-exp merge), so memory is bounded by `chunk_size` keys whatever the number of slow tokens.
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
    batch_q, num_heads, query_len, _ = query.shape
    batch_k, num_kv_heads = key.shape[:2]
    if batch_q % batch_k or num_heads % num_kv_heads:
        raise ValueError(
            f"query batch/heads ({batch_q}, {num_heads}) are not multiples of slow batch/heads ({batch_k}, "
            f"{num_kv_heads})."
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    repeats, groups = batch_q // batch_k, num_heads // num_kv_heads
    folded = rearrange(query, "(b n) (h g) l d -> b h (n g l) d", n=repeats, g=groups)
    if implementation == "eager":
        out = chunked_eager_attention(folded, key, value, key_padding_mask, scaling=scaling, chunk_size=chunk_size)
    else:  # sdpa; flash-attention base models also run this branch through SDPA's fused kernels
        mask = key_padding_mask[:, None, None, :]  # [B_k, 1, 1, S]
        out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return rearrange(out, "b h (n g l) d -> (b n) (h g) l d", n=repeats, g=groups, l=query_len)


def chunked_eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor,
    *,
    scaling: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """softmax(q k^T * scaling, masked) v, over the keys in chunks merged with an online softmax.

    query: [B, H, M, hd]; key, value: [B, H, S, hd]; key_padding_mask: [B, S] (True = attend, at least
    one per row). Returns [B, H, M, hd] in the query's dtype. Scores, running max and sum are float32
    (or float64 for float64 inputs); peak extra memory is O(B * H * M * chunk_size), not O(.. * S).

    With one chunk this is the plain softmax: masked scores are set to the dtype's lowest value, so
    they get weight exactly 0 once a real key has been seen; a chunk with no real key so far only adds
    weight that the next real key's rescaling factor exp(min - max) = 0 wipes out.
    """
    stats_dtype = torch.promote_types(query.dtype, torch.float32)
    lowest = torch.finfo(stats_dtype).min
    running_max = running_sum = acc = None
    for start in range(0, key.shape[-2], chunk_size):
        stop = start + chunk_size
        scores = torch.matmul(query, key[..., start:stop, :].transpose(-1, -2)) * scaling  # [B, H, M, c]
        scores = scores.to(stats_dtype).masked_fill(~key_padding_mask[:, None, None, start:stop], lowest)
        chunk_max = scores.amax(dim=-1, keepdim=True)
        new_max = chunk_max if running_max is None else torch.maximum(running_max, chunk_max)
        probs = torch.exp(scores - new_max)  # [B, H, M, c], unnormalised
        chunk_out = torch.matmul(probs.to(value.dtype), value[..., start:stop, :]).to(stats_dtype)
        if running_max is None:
            running_sum, acc = probs.sum(dim=-1, keepdim=True), chunk_out
        else:
            rescale = torch.exp(running_max - new_max)
            running_sum = running_sum * rescale + probs.sum(dim=-1, keepdim=True)
            acc = acc * rescale + chunk_out
        running_max = new_max
    return (acc / running_sum).to(query.dtype)
