"""The pure-torch kernels against independent dense computations, outputs poisoned beforehand."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from adakv.kernels import append_, compact_, copy_segments_, ragged_attention


def _layout(lengths: torch.Tensor, slack: int) -> torch.Tensor:
    cap = (lengths + slack).reshape(-1)
    return (torch.cumsum(cap, 0) - cap).reshape(lengths.shape)


def _poisoned(rows: int, dim: int) -> torch.Tensor:
    return torch.full((rows, dim), float("nan"))


def dense_reference(q, keys, values, lengths, scaling, softcap=None):
    """q [B,H,G,Q,D]; keys/values padded [B,H,M,D]; lengths [B,H]; causal bottom-right, via F.sdpa-free math."""
    bsz, heads, group, q_len, dim = q.shape
    m = keys.shape[2]
    out = torch.zeros_like(q, dtype=torch.float64)
    for b in range(bsz):
        for h in range(heads):
            n = int(lengths[b, h])
            for i in range(q_len):
                vis = n - (q_len - 1 - i)
                if vis <= 0:
                    continue
                logits = (q[b, h, :, i].double() @ keys[b, h, :vis].double().T) * scaling
                if softcap is not None:
                    logits = torch.tanh(logits / softcap) * softcap
                out[b, h, :, i] = torch.softmax(logits, -1) @ values[b, h, :vis].double()
    assert m >= int(lengths.max())
    return out


@settings(max_examples=25, deadline=None)
@given(
    bsz=st.integers(1, 3),
    heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    q_len=st.integers(1, 3),
    dim=st.sampled_from([8, 16, 64]),
    max_len=st.integers(1, 70),
    softcap=st.sampled_from([None, 5.0]),
    seed=st.integers(0, 2**16),
)
def test_ragged_attention_matches_dense(bsz, heads, group, q_len, dim, max_len, softcap, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (bsz, heads), generator=gen)
    lengths[0, 0] = max_len  # one long segment beside short ones: very uneven
    if lengths.numel() > 1:
        lengths[-1, -1] = 1
    start = _layout(lengths, slack=3)
    rows = int((lengths + 3).sum())
    k_buf, v_buf = _poisoned(rows, dim), _poisoned(rows, dim)  # slack stays NaN: it must never be read
    keys = torch.randn(bsz, heads, max_len, dim, generator=gen)
    values = torch.randn(bsz, heads, max_len, dim, generator=gen)
    for b in range(bsz):
        for h in range(heads):
            n, s = int(lengths[b, h]), int(start[b, h])
            k_buf[s : s + n], v_buf[s : s + n] = keys[b, h, :n], values[b, h, :n]
    q = torch.randn(bsz, heads, group, q_len, dim, generator=gen)
    out = ragged_attention(q, k_buf, v_buf, start, lengths, dim**-0.5, softcap)
    ref = dense_reference(q, keys, values, lengths, dim**-0.5, softcap)
    assert out.shape == q.shape and torch.isfinite(out).all()
    err = (out.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-12)
    assert err < 1e-5


def test_ragged_decode_matches_sdpa_with_mask():
    """Decode (one query) equals torch's sdpa over a dense, padded, masked layout (fp32)."""
    gen = torch.Generator().manual_seed(1)
    bsz, heads, group, dim = 2, 3, 3, 64
    lengths = torch.tensor([[1, 500, 37], [2, 0, 999]])
    start = _layout(lengths, slack=5)
    k_buf, v_buf = _poisoned(int((lengths + 5).sum()), dim), _poisoned(int((lengths + 5).sum()), dim)
    m = int(lengths.max())
    keys, values = torch.randn(bsz, heads, m, dim, generator=gen), torch.randn(bsz, heads, m, dim, generator=gen)
    for b in range(bsz):
        for h in range(heads):
            n, s = int(lengths[b, h]), int(start[b, h])
            k_buf[s : s + n], v_buf[s : s + n] = keys[b, h, :n], values[b, h, :n]
    q = torch.randn(bsz, heads, group, 1, dim, generator=gen)
    out = ragged_attention(q, k_buf, v_buf, start, lengths, dim**-0.5)
    mask = torch.arange(m)[None, None, None, :] < lengths[:, :, None, None]  # [B, H, 1, M]
    ref = F.scaled_dot_product_attention(q.reshape(bsz, heads, group, dim), keys, values, attn_mask=mask)
    ref = torch.where(lengths[:, :, None, None] > 0, ref, 0.0)  # an empty segment attends to nothing
    rel = (out[:, :, :, 0] - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5
    assert (out[1, 1] == 0).all()


def test_ragged_attention_hidden_offsets():
    """``hidden`` hides trailing tokens per query (padding inside an appended chunk)."""
    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([[6]])
    k_buf, v_buf = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    q = torch.randn(1, 1, 1, 3, 8, generator=gen)
    hidden = torch.tensor([[2, 0, 0]])
    out = ragged_attention(q, k_buf, v_buf, torch.tensor([[0]]), lengths, 0.3, hidden=hidden)
    for i, vis in enumerate([4, 6, 6]):
        p = torch.softmax(q[0, 0, 0, i] @ k_buf[:vis].T * 0.3, -1)
        torch.testing.assert_close(out[0, 0, 0, i], p @ v_buf[:vis])


def test_compact_writes_kept_tokens_in_order():
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 3, 10, 4, generator=gen), torch.randn(2, 3, 10, 4, generator=gen)
    keep = torch.rand(2, 3, 10, generator=gen) < 0.4
    keep[1, 2] = False  # an empty segment
    lengths = keep.sum(-1)
    start = _layout(lengths, slack=2)
    k_buf, v_buf = _poisoned(int((lengths + 2).sum()), 4), _poisoned(int((lengths + 2).sum()), 4)
    compact_(k_buf, v_buf, keys, values, keep, start)
    for b in range(2):
        for h in range(3):
            s, n = int(start[b, h]), int(lengths[b, h])
            assert torch.equal(k_buf[s : s + n], keys[b, h][keep[b, h]])
            assert torch.equal(v_buf[s : s + n], values[b, h][keep[b, h]])
            assert torch.isnan(k_buf[s + n : s + n + 2]).all()  # slack untouched


def test_append_and_copy_segments():
    gen = torch.Generator().manual_seed(4)
    lengths = torch.tensor([[2, 0], [1, 3]])
    start = _layout(lengths, slack=3)
    rows = int((lengths + 3).sum())
    k_buf, v_buf = torch.randn(rows, 4, generator=gen), torch.randn(rows, 4, generator=gen)
    before_k = k_buf.clone()
    new_k, new_v = torch.randn(2, 2, 3, 4, generator=gen), torch.randn(2, 2, 3, 4, generator=gen)
    valid = torch.tensor([[True, True, True], [False, True, True]])
    append_(k_buf, v_buf, new_k, new_v, start, lengths, valid)
    for b in range(2):
        for h in range(2):
            s, n = int(start[b, h]), int(lengths[b, h])
            kept = new_k[b, h][valid[b]]
            assert torch.equal(k_buf[s + n : s + n + len(kept)], kept)
            assert torch.equal(k_buf[s : s + n], before_k[s : s + n])  # old tokens untouched
    new_len = lengths + valid.sum(-1, keepdim=True)
    dst_start = _layout(new_len, slack=1)
    dst_k, dst_v = _poisoned(int((new_len + 1).sum()), 4), _poisoned(int((new_len + 1).sum()), 4)
    copy_segments_(dst_k, dst_v, k_buf, v_buf, start, dst_start, new_len)
    for b in range(2):
        for h in range(2):
            s, d, n = int(start[b, h]), int(dst_start[b, h]), int(new_len[b, h])
            assert torch.equal(dst_k[d : d + n], k_buf[s : s + n])
            assert torch.equal(dst_v[d : d + n], v_buf[s : s + n])
