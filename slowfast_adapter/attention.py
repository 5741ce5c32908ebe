"""Non-causal cross-attention of query tokens over slow tokens (GQA, key padding, no K/V copies)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def slow_cross_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor,
    *,
    scaling: float,
    implementation: str = "sdpa",
) -> torch.Tensor:
    """Attend queries to the slow tokens of their own sample.

    query: [B_q, H, L_q, hd]; key, value: [B_k, H_kv, S, hd]; key_padding_mask: [B_k, S] (True = attend).
    B_q may be a multiple n of B_k (beam search / several returned sequences): query rows
    b*n .. b*n+n-1 belong to slow sample b, as `repeat_interleave` lays them out.
    Returns [B_q, H, L_q, hd].

    GQA and the batch expansion are folded into the query length ([B_k, H_kv, n*G*L_q, hd]), so the
    slow K/V are never repeated in memory; this is exact because every query row attends to the same
    keys regardless of the others (no causal mask).
    """
    batch_q, num_heads, query_len, _ = query.shape
    batch_k, num_kv_heads = key.shape[:2]
    if batch_q % batch_k or num_heads % num_kv_heads:
        raise ValueError(
            f"query batch/heads ({batch_q}, {num_heads}) are not multiples of slow batch/heads ({batch_k}, "
            f"{num_kv_heads})."
        )
    repeats, groups = batch_q // batch_k, num_heads // num_kv_heads
    folded = rearrange(query, "(b n) (h g) l d -> b h (n g l) d", n=repeats, g=groups)
    mask = key_padding_mask[:, None, None, :]  # [B_k, 1, 1, S]
    if implementation == "eager":
        scores = torch.matmul(folded, key.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        out = torch.matmul(probs.to(value.dtype), value)
    else:  # sdpa; flash-attention base models also run this branch through SDPA's fused kernels
        out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return rearrange(out, "b h (n g l) d -> (b n) (h g) l d", n=repeats, g=groups, l=query_len)
