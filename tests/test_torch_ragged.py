"""The copy-free torch ragged attention (kernels/torch_ragged.py) against the reference, on poisoned buffers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adakv import with_cache
from adakv.kernels import reference, torch_ragged

pytestmark = pytest.mark.fast

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _layout(lengths: torch.Tensor, slack: torch.Tensor | int) -> torch.Tensor:
    cap = (lengths + slack).reshape(-1)
    return (torch.cumsum(cap, 0) - cap).reshape(lengths.shape)


def _buffers(lengths, start, rows, dim, dtype, gen):
    """Flat K/V buffers whose rows outside every segment are NaN: reading one poisons the output."""
    k_buf = torch.full((rows, dim), float("nan"), dtype=dtype)
    v_buf = torch.full((rows, dim), float("nan"), dtype=dtype)
    for s, n in zip(start.reshape(-1).tolist(), lengths.reshape(-1).tolist()):
        k_buf[s : s + n] = (2 * torch.randn(n, dim, generator=gen)).to(dtype)
        v_buf[s : s + n] = torch.randn(n, dim, generator=gen).to(dtype)
    return k_buf, v_buf


def _compare(lengths, group, q_len, dim, dtype, softcap, hidden, gen, slack=None, host=False):
    bsz, heads = lengths.shape
    if slack is None:
        slack = torch.randint(0, 4, lengths.shape, generator=gen)
    start = _layout(lengths, slack)
    rows = int((lengths + slack).sum()) + 3  # unused NaN rows at the end as well
    k_buf, v_buf = _buffers(lengths, start, rows, dim, dtype, gen)
    q = torch.randn(bsz, heads, group, q_len, dim, generator=gen).to(dtype)
    scaling = dim**-0.5
    extra = {"host_start": start.reshape(-1).tolist(), "host_length": lengths} if host else {}
    out = torch_ragged.ragged_attention(q, k_buf, v_buf, start, lengths, scaling, softcap, hidden, **extra)
    ref = reference.ragged_attention(q, k_buf, v_buf, start, lengths, scaling, softcap, hidden)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    return out


@settings(max_examples=60, deadline=None)
@given(
    bsz=st.integers(1, 3),
    heads=st.integers(1, 4),
    group=st.sampled_from([1, 2, 4, 8]),
    q_len=st.integers(1, 5),
    dim=st.sampled_from([8, 64, 80, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    max_len=st.integers(1, 200),
    softcap=st.sampled_from([None, 5.0, 30.0]),
    use_hidden=st.booleans(),
    uniform=st.booleans(),
    host=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(bsz, heads, group, q_len, dim, dtype, max_len, softcap, use_hidden, uniform, host, seed):
    gen = torch.Generator().manual_seed(seed)
    if uniform:  # equal lengths and capacities: segments are read as strided runs (batched matmuls)
        lengths = torch.full((bsz, heads), max_len, dtype=torch.int64)
        slack = int(torch.randint(0, 4, (1,), generator=gen)) if seed % 2 else None  # None: unequal spacing
    else:  # very uneven: one long segment, others short, zero or one token
        lengths = torch.randint(0, max_len + 1, (bsz, heads), generator=gen)
        lengths.view(-1)[0] = max_len
        if lengths.numel() > 1:
            lengths.view(-1)[-1] = int(torch.randint(0, 2, (1,), generator=gen))
        slack = None
    # hidden: any values in [0, Q], more than a short segment holds included (that query sees nothing)
    hidden = torch.randint(0, q_len + 1, (bsz, q_len), generator=gen) if use_hidden else None
    _compare(lengths, group, q_len, dim, dtype, softcap, hidden, gen, slack=slack, host=host)


def test_decode_shapes_with_long_uneven_heads():
    """Decode-like: one query, long and very uneven segments next to empty and one-token ones."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([[2000, 3, 1], [0, 700, 57]])
    for dtype in (torch.float32, torch.bfloat16):
        _compare(lengths, 3, 1, 64, dtype, None, None, gen)
        _compare(lengths, 3, 1, 64, dtype, 30.0, None, gen)


def test_segments_that_see_nothing_output_zeros():
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([[0, 2, 5]])
    hidden = torch.tensor([[4, 3, 2, 0]])  # query 0 sees 5 - 4 = 1 row of the last segment, none of the others
    out = _compare(lengths, 2, 4, 16, torch.float32, None, hidden, gen)
    assert (out[0, 0] == 0).all() and (out[0, 1, :, :2] == 0).all()
    empty = torch.zeros(2, 3, dtype=torch.int64)
    out = _compare(empty, 2, 1, 16, torch.float32, None, None, gen)
    assert (out == 0).all()


def test_uniform_runs_cross_sequence_rows_only_with_equal_hidden():
    """Equal, equally spaced segments of two sequences whose hidden patterns differ: not one run."""
    gen = torch.Generator().manual_seed(2)
    lengths = torch.full((2, 3), 9, dtype=torch.int64)
    hidden = torch.tensor([[2, 1, 0], [0, 0, 0]])
    _compare(lengths, 2, 3, 32, torch.float32, None, hidden, gen, slack=2)
    _compare(lengths, 2, 3, 32, torch.float32, 10.0, None, gen, slack=0)  # no slack at all: back-to-back
    uneven_spacing = torch.tensor([[1, 1, 4], [0, 2, 2]])  # equal lengths, unequal gaps: runs must break
    _compare(lengths, 2, 1, 32, torch.float32, None, None, gen, slack=uneven_spacing)


def test_positional_signature_matches_the_reference():
    """Called positionally like the reference (max_len included); the host metadata is keyword-only."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([[4, 1]])
    start = _layout(lengths, 2)
    k_buf, v_buf = _buffers(lengths, start, 10, 8, torch.float32, gen)
    q = torch.randn(1, 2, 2, 1, 8, generator=gen)
    args = (q, k_buf, v_buf, start, lengths, 0.5, None, None, 4)
    torch.testing.assert_close(torch_ragged.ragged_attention(*args), reference.ragged_attention(*args))
    with pytest.raises(ValueError, match="segment entries"):
        torch_ragged.ragged_attention(*args, host_length=[4])


def test_backend_uses_it():
    from adakv.kernels import ops_for

    if ops_for(torch.zeros(1)).name == "torch":
        assert ops_for(torch.zeros(1)).ragged_attention is torch_ragged.ragged_attention


@pytest.mark.fast
def test_forward_with_grad_enabled_goes_through_autograd():
    """A plain model(...) call (no torch.no_grad) must work: the in-place fast path steps aside for autograd."""
    from tiny_models import padded_batch, tiny_model

    from adakv import AdaKVCache

    model = tiny_model("llama")
    ids, mask = padded_batch()
    cache = AdaKVCache(model, 0.5, window=4, backend="torch")
    out = model(ids, attention_mask=mask, **with_cache(cache))
    step = model(out.logits[:, -1:].argmax(-1), **with_cache(cache))
    step.logits.sum().backward()
    assert model.lm_head.weight.grad is not None
