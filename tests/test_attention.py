import pytest
import torch

from slowfast_adapter.attention import slow_cross_attention


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
