"""The exporter's grouped-query attention against the reference it replaced: every KV head
repeated for its query heads (transformers' ``repeat_kv``), then plain attention."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")

from exporter.decoder_torch import _additive_mask, grouped_attention  # noqa: E402


def reference(query, key, value, mask, scale):
    groups = query.shape[1] // key.shape[1]
    keys = modeling_llama.repeat_kv(key, groups)
    values = modeling_llama.repeat_kv(value, groups)
    scores = torch.matmul(query, keys.transpose(2, 3)) * scale + mask
    return torch.matmul(torch.softmax(scores, dim=-1), values)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "tokens"),
    [(9, 3, 1), (9, 3, 5), (4, 2, 1), (4, 2, 7), (4, 4, 3), (8, 1, 2)],
)
def test_grouped_attention_equals_attention_over_repeated_kv(
    heads: int, kv_heads: int, tokens: int
) -> None:
    generator = torch.Generator().manual_seed(heads * 100 + kv_heads * 10 + tokens)
    batch, past, dim = 3, 6, 16
    total = past + tokens
    query = torch.randn(batch, heads, tokens, dim, generator=generator)
    key = torch.randn(batch, kv_heads, total, dim, generator=generator)
    value = torch.randn(batch, kv_heads, total, dim, generator=generator)
    attention_mask = torch.ones(batch, total, dtype=torch.int64)
    attention_mask[1, :2] = 0  # left padding in two rows, of different lengths
    attention_mask[2, :5] = 0
    mask = _additive_mask(attention_mask, tokens, torch.float32)
    got = grouped_attention(query, key, value, mask, dim**-0.5)
    want = reference(query, key, value, mask, dim**-0.5)
    assert got.shape == (batch, heads, tokens, dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a padded key changes nothing: row 2 gives the same answer whatever its padding holds
    key[2, :, :5] = 1e3
    torch.testing.assert_close(
        grouped_attention(query, key, value, mask, dim**-0.5)[2], want[2], rtol=1e-5, atol=1e-5
    )
