"""Triton kernels against the torch reference (interpreted on CPU in CI), outputs poisoned beforehand."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import nan_alloc

from adakv import with_cache
from adakv.kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
from adakv.kernels import triton_attention, triton_copy  # noqa: E402  (after TRITON_INTERPRET is set by conftest)

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def poisoned_scratch(monkeypatch):
    monkeypatch.setattr(triton_attention, "_alloc", nan_alloc)


def _layout(lengths: torch.Tensor, slack: int) -> torch.Tensor:
    cap = (lengths + slack).reshape(-1)
    return (torch.cumsum(cap, 0) - cap).reshape(lengths.shape)


@settings(max_examples=30, deadline=None)
@given(
    bsz=st.integers(1, 2),
    heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4, 8]),
    q_len=st.sampled_from([1, 1, 3]),
    dim=st.sampled_from([64, 80, 96, 128, 256]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    max_len=st.integers(1, 300),
    softcap=st.sampled_from([None, 30.0]),
    use_hidden=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ragged_attention_matches_reference(bsz, heads, group, q_len, dim, dtype, max_len, softcap, use_hidden, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (bsz, heads), generator=gen)
    lengths.view(-1)[0] = max_len  # very uneven: one long segment, others short, zero or one token
    if lengths.numel() > 1:
        lengths.view(-1)[-1] = int(torch.randint(0, 2, (1,), generator=gen))
    _compare_attention(lengths, group, q_len, dim, dtype, softcap, use_hidden, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len", [1, 3])
def test_long_segments_split_and_merge(dtype, q_len):
    """Segments long enough for several splits (the log-sum-exp merge kernel) next to empty and short ones."""
    lengths = torch.tensor([[2000, 3], [0, 700]])
    _compare_attention(lengths, 4, q_len, 64, dtype, None, q_len > 1, torch.Generator().manual_seed(q_len))


def test_attention_refuses_buffers_it_would_misread_and_takes_no_queries():
    """A view of a wider buffer (rows not `dim` apart) was read wrongly without a word; no query rows crashed."""
    from adakv.kernels import triton_decode

    lengths = torch.tensor([[5, 3]], device=DEVICE)
    start = torch.tensor([[0, 8]], device=DEVICE)
    wide = torch.randn(16, 128, device=DEVICE)
    q = torch.randn(1, 2, 1, 1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        triton_attention.ragged_attention(q, wide[:, :64], wide[:, 64:], start, lengths, 0.125)
    new = torch.randn(1, 2, 1, 64, device=DEVICE)
    counters = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        triton_decode.decode_(q, new, new, wide[:, :64], wide[:, 64:], start, lengths, counters, 0.125, None, 8)
    empty = q[:, :, :, :0]
    assert (
        triton_attention.ragged_attention(
            empty, wide[:, :64].contiguous(), wide[:, 64:].contiguous(), start, lengths, 0.125
        ).shape
        == empty.shape
    )


def _compare_attention(lengths, group, q_len, dim, dtype, softcap, use_hidden, gen):
    bsz, heads = lengths.shape
    start = _layout(lengths, slack=5)
    rows = int((lengths + 5).sum())
    k_buf = torch.full((rows, dim), float("nan"), dtype=dtype)  # slack is NaN: it must never be read
    v_buf = torch.full((rows, dim), float("nan"), dtype=dtype)
    for b in range(bsz):
        for h in range(heads):
            s, n = int(start[b, h]), int(lengths[b, h])
            k_buf[s : s + n] = torch.randn(n, dim, generator=gen).to(dtype)
            v_buf[s : s + n] = torch.randn(n, dim, generator=gen).to(dtype)
    q = torch.randn(bsz, heads, group, q_len, dim, generator=gen).to(dtype)
    hidden = torch.randint(0, q_len, (bsz, q_len), generator=gen) if use_hidden else None
    args = [x.to(DEVICE) for x in (q, k_buf, v_buf, start, lengths)]
    hid = None if hidden is None else hidden.to(DEVICE)
    out = triton_attention.ragged_attention(*args, dim**-0.5, softcap, hid).cpu()
    ref = reference.ragged_attention(q, k_buf, v_buf, start, lengths, dim**-0.5, softcap, hidden)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    err = (out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6)
    assert err < TOL[dtype], (err, dtype)


@settings(max_examples=20, deadline=None)
@given(
    bsz=st.integers(1, 3),
    heads=st.integers(1, 3),
    seq=st.integers(1, 40),
    q_len=st.integers(1, 4),
    dim=st.sampled_from([64, 80, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_copy_kernels_match_reference(bsz, heads, seq, q_len, dim, dtype, transposed, seed):
    gen = torch.Generator().manual_seed(seed)

    def dense(length):
        if transposed:  # the layout attention layers produce: [B, L, H, D] viewed as [B, H, L, D]
            return torch.randn(bsz, length, heads, dim, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(bsz, heads, length, dim, generator=gen).to(dtype)

    keys, values = dense(seq), dense(seq)
    keep = torch.rand(bsz, heads, seq, generator=gen) < 0.5
    lengths = keep.sum(-1)
    start = _layout(lengths, slack=q_len + 1)
    rows = int((lengths + q_len + 1).sum())

    def pair():
        return torch.full((rows, dim), float("nan"), dtype=dtype), torch.full((rows, dim), float("nan"), dtype=dtype)

    ref_k, ref_v = pair()
    tri_k, tri_v = pair()
    reference.compact_(ref_k, ref_v, keys, values, keep, start)
    tri_k, tri_v = tri_k.to(DEVICE), tri_v.to(DEVICE)
    triton_copy.compact_(tri_k, tri_v, keys.to(DEVICE), values.to(DEVICE), keep.to(DEVICE), start.to(DEVICE))
    assert torch.equal(tri_k.cpu().isnan(), ref_k.isnan()) and torch.equal(tri_k.cpu().nan_to_num(), ref_k.nan_to_num())
    assert torch.equal(tri_v.cpu().nan_to_num(), ref_v.nan_to_num())

    new_k, new_v = dense(q_len), dense(q_len)
    valid = None if seed % 2 else torch.rand(bsz, q_len, generator=gen) < 0.7
    reference.append_(ref_k, ref_v, new_k, new_v, start, lengths, valid)
    triton_copy.append_(
        tri_k,
        tri_v,
        new_k.to(DEVICE),
        new_v.to(DEVICE),
        start.to(DEVICE),
        lengths.to(DEVICE),
        None if valid is None else valid.to(DEVICE),
    )
    assert torch.equal(tri_k.cpu().isnan(), ref_k.isnan()) and torch.equal(tri_k.cpu().nan_to_num(), ref_k.nan_to_num())
    assert torch.equal(tri_v.cpu().nan_to_num(), ref_v.nan_to_num())

    grown = lengths + (q_len if valid is None else valid.sum(-1, keepdim=True))
    dst_start = _layout(grown, slack=2)
    out_rows = int((grown + 2).sum())
    ref_dk = torch.full((out_rows, dim), float("nan"), dtype=dtype)
    ref_dv = ref_dk.clone()
    tri_dk, tri_dv = ref_dk.clone().to(DEVICE), ref_dv.clone().to(DEVICE)
    reference.copy_segments_(ref_dk, ref_dv, ref_k, ref_v, start, dst_start, grown)
    triton_copy.copy_segments_(tri_dk, tri_dv, tri_k, tri_v, start.to(DEVICE), dst_start.to(DEVICE), grown.to(DEVICE))
    assert torch.equal(tri_dk.cpu().isnan(), ref_dk.isnan())
    assert torch.equal(tri_dk.cpu().nan_to_num(), ref_dk.nan_to_num())
    assert torch.equal(tri_dv.cpu().nan_to_num(), ref_dv.nan_to_num())


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_with_triton_backend_matches_torch(family, monkeypatch):
    """End to end: compressed prefill, decode and a question appended, through the Triton kernels."""
    from tiny_models import padded_batch, tiny_model

    from adakv import AdaKVCache

    model = tiny_model(family).to(DEVICE)
    ids, mask = (t.to(DEVICE) for t in padded_batch(seq_len=56))
    outs = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("ADAKV_BACKEND", backend)
        cache = AdaKVCache(model, budget=0.4, window=4)
        with torch.no_grad():
            model(ids[:, :40], attention_mask=mask[:, :40], **with_cache(cache))
            outs.append(
                model.generate(ids, attention_mask=mask, **with_cache(cache), max_new_tokens=6, do_sample=False)
            )
    assert torch.equal(*outs)


def test_backend_selection_errors(monkeypatch):
    from tiny_models import tiny_model

    from adakv import AdaKVCache
    from adakv.kernels import ops_for

    monkeypatch.setenv("ADAKV_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="use one of torch, triton, triton-fused, flash"):
        ops_for(torch.zeros(1))
    monkeypatch.setenv("ADAKV_BACKEND", "flash")
    with pytest.raises(ValueError, match="flash backend cannot run here: it needs CUDA tensors"):
        ops_for(torch.zeros(1))
    with pytest.raises(ValueError, match="flash backend cannot run here"):  # at construction, not at the forward
        AdaKVCache(tiny_model("llama"), 0.5, backend="flash")
    with pytest.raises(ValueError, match="backend must be one of"):
        AdaKVCache(tiny_model("llama"), 0.5, backend="cuda-magic")
    monkeypatch.setenv("ADAKV_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            ops_for(torch.zeros(1))
    monkeypatch.delenv("ADAKV_BACKEND")
    assert ops_for(torch.zeros(1)).name == "torch"
