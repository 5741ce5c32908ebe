import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from slowfast_adapter.core import attention
from slowfast_adapter.core.attention import chunked_eager_attention, kernel_for, slow_cross_attention
from slowfast_adapter.core.types import PackedKeys, SlowTokens


def _reference(query, key, value, mask, scaling):
    """Per-sample, per-head loop with explicitly repeated K/V."""
    batch_q, heads = query.shape[:2]
    batch_k, kv_heads = key.shape[:2]
    n, g = batch_q // batch_k, heads // kv_heads
    out = torch.zeros_like(query)
    for b in range(batch_q):
        for h in range(heads):
            k, v = key[b // n, h // g][mask[b // n]], value[b // n, h // g][mask[b // n]]
            out[b, h] = torch.softmax(query[b, h] @ k.T * scaling, -1) @ v
    return out


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("repeats", [1, 3])
def test_matches_per_sample_reference(implementation, repeats):
    torch.manual_seed(0)
    key, value = torch.randn(2, 2, 2, 7, 8, dtype=torch.float64)
    query = torch.randn(2 * repeats, 4, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[True] * 7, [True, True, True, False, False, False, False]])
    out = slow_cross_attention(query, key, value, mask, scaling=8**-0.5, implementation=implementation)
    torch.testing.assert_close(out, _reference(query, key, value, mask, 8**-0.5), rtol=0, atol=1e-12)


def test_padding_keys_are_ignored():
    torch.manual_seed(0)
    key, value = torch.randn(2, 1, 2, 6, 4)
    query = torch.randn(1, 4, 3, 4)
    mask = torch.tensor([[True, True, True, False, False, False]])
    out = slow_cross_attention(query, key, value, mask, scaling=0.5)
    key2, value2 = key.clone(), value.clone()
    key2[:, :, 3:], value2[:, :, 3:] = 1e3, -1e3
    torch.testing.assert_close(slow_cross_attention(query, key2, value2, mask, scaling=0.5), out, rtol=0, atol=0)


def _plain_softmax(query, key, value, mask, scaling):
    """The unchunked math: one [.., L_q, S] score matrix, masked with the dtype's lowest value."""
    scores = (query @ key.transpose(-1, -2) * scaling).masked_fill(
        ~mask[:, None, None, :], torch.finfo(query.dtype).min
    )
    return torch.softmax(scores, dim=-1) @ value


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 37, 1000])
def test_chunked_eager_equals_the_unchunked_math(chunk_size):
    torch.manual_seed(0)
    key, value = torch.randn(2, 3, 2, 37, 8, dtype=torch.float64)
    query = torch.randn(3, 4, 5, 8, dtype=torch.float64)  # B_q = 3 x B_k: beam-style repeats
    key, value = key[:1].expand(3, -1, -1, -1), value[:1].expand(3, -1, -1, -1)
    mask = torch.rand(3, 37) > 0.5
    mask[0] = False
    mask[0, 20] = True  # one real key, after whole chunks of padding (chunk_size 1, 3, 16)
    mask[1, :] = True
    folded = query.view(3, 2, 2, 5, 8).flatten(2, 3)  # [B, H_kv, G * L_q, hd] like slow_cross_attention folds
    out = chunked_eager_attention(folded, key, value, mask, scaling=0.3, chunk_size=chunk_size)
    torch.testing.assert_close(out, _plain_softmax(folded, key, value, mask, 0.3), rtol=0, atol=1e-13)
    via_api = slow_cross_attention(query, key, value, mask, scaling=0.3, implementation="eager", chunk_size=chunk_size)
    torch.testing.assert_close(via_api, _reference(query, key, value, mask, 0.3), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_eager_matches_sdpa_in_low_precision(dtype):
    torch.manual_seed(0)
    key, value = torch.randn(2, 2, 2, 300, 16).to(dtype)
    query = torch.randn(2, 4, 6, 16).to(dtype)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, 120:] = False
    eager = slow_cross_attention(query, key, value, mask, scaling=0.25, implementation="eager", chunk_size=64)
    sdpa = slow_cross_attention(query, key, value, mask, scaling=0.25, implementation="sdpa")
    reference = _reference(query.double(), key.double(), value.double(), mask, 0.25)
    assert eager.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(eager.double(), reference, rtol=tol, atol=tol)
    torch.testing.assert_close(sdpa.double(), reference, rtol=tol, atol=tol)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_eager_memory_is_bounded_by_the_chunk_not_the_slow_length():
    """No intermediate of the eager kernel grows with the number of slow tokens beyond K/V themselves."""
    torch.manual_seed(0)
    queries, chunk = 50, 256
    for slow_len in (1024, 8192):
        key, value = torch.randn(2, 1, 2, slow_len, 8)
        query = torch.randn(1, 4, queries, 8)
        mask = torch.ones(1, slow_len, dtype=torch.bool)
        with _LargestTensor() as probe:
            slow_cross_attention(query, key, value, mask, scaling=0.3, implementation="eager", chunk_size=chunk)
        assert probe.largest <= 2 * 2 * queries * chunk  # [B, H_kv, G * L_q, chunk]: independent of slow_len


def test_bad_chunk_size_is_refused():
    key = value = torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        slow_cross_attention(torch.zeros(1, 1, 1, 2), key, value, torch.ones(1, 4, dtype=torch.bool), scaling=1.0,
                             chunk_size=0)  # fmt: skip


# ------------------------------------------------------------------------- which kernel runs, and with what mask
def test_kernel_choice_follows_the_base_and_falls_back_to_sdpa():
    query = torch.randn(1, 2, 3, 4)
    assert kernel_for("eager", query) == "eager"
    assert kernel_for("sdpa", query) == "sdpa"
    # flash-attn needs a CUDA half-precision query (and the package): on a CPU tensor SDPA runs instead
    assert kernel_for("flash_attention_2", query.bfloat16()) == "sdpa"


@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_gets_no_mask_unless_a_row_is_padded(monkeypatch, padded):
    """No mask lets SDPA pick its flash kernel; a padded batch passes the boolean [B, 1, 1, S] form that SDPA's
    memory-efficient and cuDNN kernels take."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    mask = torch.ones(2, 6, dtype=torch.bool)
    if padded:
        mask[1, 4:] = False
    slow = SlowTokens(torch.randn(2, 6, 8), mask)
    assert slow.padded is padded
    key, value = torch.randn(2, 2, 1, 6, 4)
    slow_cross_attention(torch.randn(2, 2, 3, 4), key, value, slow.kernel_mask, scaling=0.5)
    assert (seen[0] is None) is not padded
    if padded:
        assert seen[0].dtype == torch.bool and seen[0].shape == (2, 1, 1, 6)


def _varlen_stand_in(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    """flash-attn's varlen contract ([total, H, hd] packed rows cut by cu_seqlens), computed segment by segment."""
    assert not causal and q.dtype == k.dtype
    out = torch.empty_like(q)
    for b in range(cu_seqlens_q.numel() - 1):
        qs, ks = slice(cu_seqlens_q[b], cu_seqlens_q[b + 1]), slice(cu_seqlens_k[b], cu_seqlens_k[b + 1])
        assert ks.stop - ks.start <= max_seqlen_k and qs.stop - qs.start <= max_seqlen_q
        scores = torch.einsum("mhd,shd->hms", q[qs], k[ks]) * softmax_scale
        out[qs] = torch.einsum("hms,shd->mhd", scores.softmax(-1), v[ks])
    return out


def _dense_stand_in(q, k, v, *, softmax_scale, causal):
    """flash-attn's [B, S, H, hd] contract, computed with SDPA."""
    assert not causal
    out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=softmax_scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("padded", [False, True])
def test_flash_attn_layout_matches_the_reference(padded):
    """The flash-attn path's layout work (folding, varlen packing of padded rows, cu_seqlens), checked with stand-ins
    that follow flash-attn's documented contract; the kernel itself runs only on a GPU with flash-attn installed."""
    torch.manual_seed(0)
    key, value = torch.randn(2, 3, 2, 7, 8, dtype=torch.float64)
    query = torch.randn(3, 4, 5, 8, dtype=torch.float64)[:3].repeat(2, 1, 1, 1)[:6]  # B_q = 2 x B_k, GQA 2
    mask = torch.ones(3, 7, dtype=torch.bool)
    if padded:
        mask[1, 3:] = False
        mask[2, 1:] = False
    folded, unfold = attention._fold_queries(query, key)
    packed = PackedKeys.from_mask(mask) if padded else None
    out = attention._flash_attention(
        folded, key, value, packed, scaling=8**-0.5, functions=(_dense_stand_in, _varlen_stand_in)
    )
    torch.testing.assert_close(unfold(out), _reference(query, key, value, mask, 8**-0.5), rtol=0, atol=1e-12)
