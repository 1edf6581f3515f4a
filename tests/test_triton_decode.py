"""The fused decode launch (``kernels/triton_decode.py``) against append_ + length + 1 + the reference attention.

Interpreted on the CPU in CI (TRITON_INTERPRET=1, set by conftest); on a GPU session the same tests run the
compiled kernel in every dtype. Outputs, scratch and slack rows are NaN beforehand, so an element the kernel
should have written and did not, or a slack row it read, shows.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import compiled_decode_matches_eager, nan_alloc, padded_batch, tiny_model

from adakv import AdaKVCache, with_cache
from adakv.kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
from adakv.kernels import triton_decode  # noqa: E402  (after TRITON_INTERPRET is set by conftest)

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def poisoned_scratch(monkeypatch):
    monkeypatch.setattr(triton_decode, "_alloc", nan_alloc)


def _step(lengths, group, dim, dtype, softcap, width, gen, transposed=False, slack=3):
    """Run one fused step and the reference on the same ragged layout; return both sides."""
    bsz, heads = lengths.shape
    cap = (lengths + slack).reshape(-1)
    start = (torch.cumsum(cap, 0) - cap).reshape(lengths.shape)
    rows = int(cap.sum())
    k_buf = torch.full((rows, dim), float("nan"), dtype=dtype)  # slack is NaN: never read, only the new row written
    v_buf = torch.full((rows, dim), float("nan"), dtype=dtype)
    for s in range(bsz * heads):
        a, n = int(start.view(-1)[s]), int(lengths.view(-1)[s])
        k_buf[a : a + n] = torch.randn(n, dim, generator=gen).to(dtype)
        v_buf[a : a + n] = torch.randn(n, dim, generator=gen).to(dtype)
    q = torch.randn(bsz, heads, group, 1, dim, generator=gen).to(dtype)
    if transposed:  # the layout attention layers produce: [B, 1, H, D] seen as [B, H, 1, D]
        new_k = torch.randn(bsz, 1, heads, dim, generator=gen).to(dtype).transpose(1, 2)
        new_v = torch.randn(bsz, 1, heads, dim, generator=gen).to(dtype).transpose(1, 2)
    else:
        new_k = torch.randn(bsz, heads, 1, dim, generator=gen).to(dtype)
        new_v = torch.randn(bsz, heads, 1, dim, generator=gen).to(dtype)

    ref_k, ref_v, ref_len = k_buf.clone(), v_buf.clone(), lengths.clone()
    reference.append_(ref_k, ref_v, new_k, new_v, start, ref_len)
    ref_len += 1
    ref = reference.ragged_attention(q, ref_k, ref_v, start, ref_len, dim**-0.5, softcap)

    dev = [x.to(DEVICE) for x in (q, new_k, new_v, k_buf, v_buf, start, lengths)]
    counters = torch.zeros(bsz * heads, dtype=torch.int32, device=DEVICE)
    out = triton_decode.decode_(*dev, counters, dim**-0.5, softcap, width if width else int(ref_len.max()))
    return out.cpu(), ref, dev[3].cpu(), dev[4].cpu(), dev[6].cpu(), counters.cpu(), ref_k, ref_v, ref_len


def _check(result, dtype):
    out, ref, k_buf, v_buf, length, counters, ref_k, ref_v, ref_len = result
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    err = (out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6)
    assert err < TOL[dtype], (err, dtype)
    assert torch.equal(length, ref_len)  # every length advanced by exactly one
    assert torch.equal(counters, torch.zeros_like(counters))  # left ready for the next step
    for got, want in ((k_buf, ref_k), (v_buf, ref_v)):  # the new rows written, nothing else touched
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


@settings(max_examples=25, deadline=None)
@given(
    bsz=st.integers(1, 2),
    heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4, 8, 12]),
    dim=st.sampled_from([64, 80, 128, 256]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    max_len=st.integers(0, 700),
    softcap=st.sampled_from([None, 30.0]),
    fixed_width=st.booleans(),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_decode_matches_reference(bsz, heads, group, dim, dtype, max_len, softcap, fixed_width, transposed, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (bsz, heads), generator=gen)
    lengths.view(-1)[0] = max_len  # very uneven: one long segment next to short, empty or one-token ones
    if lengths.numel() > 1:
        lengths.view(-1)[-1] = int(torch.randint(0, 2, (1,), generator=gen))
    # a fixed width (the widest capacity, as a capture-safe decode passes) sizes more splits than needed
    width = max_len + 3 if fixed_width else None
    _check(_step(lengths, group, dim, dtype, softcap, width, gen, transposed), dtype)


@pytest.mark.fast
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_splits_and_merges(dtype):
    """Segments long enough for several splits (the last program merges) next to empty and short ones; the new
    token lands exactly on a split boundary for one segment."""
    n_splits, split_size = triton_decode.split_plan(4, 1025, 64, torch.device(DEVICE))
    assert n_splits > 1
    lengths = torch.tensor([[1024, 3], [0, split_size]])
    _check(_step(lengths, 4, 64, dtype, None, None, torch.Generator().manual_seed(3)), dtype)


@pytest.mark.fast
def test_fused_decode_twice_reuses_counters():
    """Two steps in a row through the same counters (what a CUDA graph replay does): both match."""
    gen = torch.Generator().manual_seed(5)
    dim, group = 64, 2
    lengths = torch.tensor([[700, 10]])
    cap = lengths + 4
    start = torch.tensor([[0, int(cap[0, 0])]])
    rows = int(cap.sum())
    k_buf = torch.randn(rows, dim, generator=gen)
    v_buf = torch.randn(rows, dim, generator=gen)
    ref_k, ref_v, ref_len = k_buf.clone(), v_buf.clone(), lengths.clone()
    counters = torch.zeros(2, dtype=torch.int32)
    dk, dv, dlen, dstart, dcount = (x.to(DEVICE) for x in (k_buf, v_buf, lengths.clone(), start, counters))
    for _ in range(2):
        q = torch.randn(1, 2, group, 1, dim, generator=gen)
        nk, nv = torch.randn(1, 2, 1, dim, generator=gen), torch.randn(1, 2, 1, dim, generator=gen)
        reference.append_(ref_k, ref_v, nk, nv, start, ref_len)
        ref_len += 1
        ref = reference.ragged_attention(q, ref_k, ref_v, start, ref_len, 0.125)
        out = triton_decode.decode_(
            q.to(DEVICE), nk.to(DEVICE), nv.to(DEVICE), dk, dv, dstart, dlen, dcount, 0.125, None, int(cap.max())
        )
        assert (out.cpu() - ref).abs().max() < 1e-5
        assert torch.equal(dlen.cpu(), ref_len) and int(dcount.abs().sum()) == 0
    assert torch.equal(dk.cpu(), ref_k) and torch.equal(dv.cpu(), ref_v)


@pytest.mark.fast
def test_fused_decode_refuses_what_it_cannot_do():
    q = torch.zeros(1, 1, 2, 3, 64)  # three query tokens
    kv = torch.zeros(1, 1, 3, 64)
    buf = torch.zeros(8, 64)
    meta = torch.zeros(1, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="one query token"):
        triton_decode.decode_(q, kv, kv, buf, buf, meta, meta, torch.zeros(1, dtype=torch.int32), 1.0, None, 4)


def test_split_plan_fills_whole_waves():
    """Splits in whole key blocks covering max_len, at least four blocks each, at most one wave beyond the
    segments' own when the segments alone fill the device."""
    dev = torch.device("cpu")
    for n_seg, max_len in [(1, 10), (1, 100_000), (8, 32_768), (256, 4096), (3, 257)]:
        n_splits, size = triton_decode.split_plan(n_seg, max_len, 64, dev)
        assert size % 64 == 0 and n_splits * size >= max_len and (n_splits - 1) * size < max_len
        assert n_splits == 1 or size >= 4 * 64 or n_splits * size - max_len < 64 * 4


@pytest.mark.parametrize("reserve", [None, 8])
def test_generate_through_fused_decode_matches_torch(reserve, monkeypatch):
    """End to end on a left-padded batch: every decoded token of the triton-fused backend goes through the fused
    launch (counted), growth past the slack / reserve included, and the tokens equal the torch and the unfused
    triton backends'; the plain triton backend never calls it."""
    calls = []
    fused = triton_decode.decode_

    def counted(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    import adakv.kernels as kernels

    monkeypatch.setattr(kernels._triton_ops(True), "decode_", counted)
    assert kernels._triton_ops(False).decode_ is None
    model = tiny_model("llama").to(DEVICE)
    ids, mask = (t.to(DEVICE) for t in padded_batch(seq_len=40))
    outs = []
    for backend in ("torch", "triton", "triton-fused"):
        cache = AdaKVCache(model, budget=0.4, window=4, backend=backend, reserve=reserve)
        with torch.no_grad():
            outs.append(
                # eager (on CUDA generate would compile a reserve cache's step, which calls the op from the graph:
                # test_static_decode and gpu_suite's compiled-generate cover that)
                model.generate(
                    ids,
                    attention_mask=mask,
                    **with_cache(cache),
                    max_new_tokens=24,
                    do_sample=False,
                    disable_compile=True,
                )
            )
        if backend == "triton":
            assert not calls
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    layers = model.config.num_hidden_layers
    assert len(calls) >= layers * 20  # most of the 23 decode steps (a step that needs a re-layout is unfused)


def test_compiled_decode_step_through_the_fused_op_has_no_graph_break():
    """With the triton-fused backend and a reserve, torch.compile(fullgraph=True) traces a whole decode step: the fused
    launch is a registered op (adakv::decode_, its mutations declared), and the logits equal the eager step's."""
    model = tiny_model("llama").to(DEVICE)
    ids, mask = (t.to(DEVICE) for t in padded_batch(seq_len=40, pad=5))
    caches = [AdaKVCache(model, 0.5, window=4, reserve=16, backend="triton-fused") for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            logits = model(ids, attention_mask=mask, **with_cache(cache)).logits
    compiled_decode_matches_eager(model, caches, logits[:, -1:].argmax(-1), mask, "aot_eager", steps=4)
    assert torch.equal(caches[0].kept_lengths(0), caches[1].kept_lengths(0))
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(a.store.length.cpu(), b.store.length.cpu())
