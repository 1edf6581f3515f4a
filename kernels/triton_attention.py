"""Triton ragged attention over adakv's flat K/V segments (decode and multi-token appends).

One program handles one KV segment, one block of its query rows (the G query
heads of the group x Q query tokens, so K/V are read once per group, never
repeated) and one split of the segment's tokens (flash-decoding: long segments
are split across programs, each keeps an online softmax, and the partial
results are merged with their log-sum-exp). Segment start and length are read
from device tensors: no host sync per step. Reference:
:func:`adakv.kernels.reference.ragged_attention`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_softmax import attend_tile, check_rows, split_partials

# Triton's CPU interpreter computes half-precision dots wrongly; it gets the exact fp32 path instead.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_alloc = torch.empty  # scratch allocation; tests swap in a NaN-filled one to catch unwritten elements


@triton.jit
def _ragged_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    start_ptr,
    length_ptr,
    hidden_ptr,
    acc_ptr,
    m_ptr,
    l_ptr,
    out_ptr,
    heads,
    n_rows,
    q_len,
    dim,
    split_size,
    n_splits,
    scaling,
    softcap,
    HAS_HIDDEN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IEEE: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)  # offsets below are products of it: int64 past 2^31 elements
    row_block = tl.program_id(1)
    split = tl.program_id(2)
    seg_start = tl.load(start_ptr + seg)
    seg_len = tl.load(length_ptr + seg)

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)  # row r = g * q_len + i
    row_ok = rows < n_rows
    qi = rows % q_len
    if HAS_HIDDEN:
        hid = tl.load(hidden_ptr + (seg // heads) * q_len + qi, mask=row_ok, other=0)
    else:
        hid = q_len - 1 - qi
    visible = seg_len - hid

    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < dim
    q = tl.load(
        q_ptr + (seg * n_rows + rows)[:, None] * dim + cols_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
    )

    lo = split * split_size
    hi = tl.minimum(lo + split_size, seg_len)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        kv_off = (seg_start + cols)[:, None] * dim + cols_d[None, :]
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        seen = (cols[None, :] < visible[:, None]) & col_ok[None, :]
        m_i, l_i, acc = attend_tile(q, k, v, seen, m_i, l_i, acc, scaling, softcap, HAS_SOFTCAP, IEEE)

    out_mask = row_ok[:, None] & d_ok[None, :]
    if SINGLE:  # one split: normalize and write the result directly (rows that saw nothing give 0)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        dst = out_ptr + (seg * n_rows + rows)[:, None] * dim + cols_d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = (seg * n_splits + split) * n_rows + rows
        tl.store(m_ptr + part, m_i, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)
        tl.store(acc_ptr + part[:, None] * dim + cols_d[None, :], acc, mask=out_mask)


@triton.jit
def _merge_splits_kernel(
    acc_ptr, m_ptr, l_ptr, out_ptr, n_rows, n_splits, dim, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Log-sum-exp merge of one (segment, row)'s splits; splits that saw nothing carry m = -inf, l = 0."""
    seg = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < n_splits
    part = (seg * n_splits + splits) * n_rows + row
    m = tl.load(m_ptr + part, mask=s_ok, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.where(m == float("-inf"), 0.0, tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max)))
    denom = tl.sum(l * weight, 0)
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < dim
    acc = tl.load(acc_ptr + part[:, None] * dim + cols_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    o = tl.sum(acc * weight[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + (seg * n_rows + row) * dim + cols_d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


def ragged_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    hidden: torch.Tensor | None = None,
    max_len: int | None = None,
    *,
    host_start: object = None,
    host_length: object = None,
) -> torch.Tensor:
    """Triton version of :func:`adakv.kernels.reference.ragged_attention`.

    ``max_len`` (the longest segment, known on the host by the cache) sizes the
    split-K grid; without it one device sync reads it. ``host_start`` / ``host_length`` are accepted so that
    every backend takes the same call (:func:`adakv.kernels.torch_ragged.ragged_attention` loops on them); the
    kernel reads the device tensors.
    """
    bsz, heads, group, q_len, dim = q.shape
    n_seg, n_rows = bsz * heads, group * q_len
    check_rows(k_buf, v_buf, dim)
    if max_len is None:
        max_len = int(length.max()) if length.numel() else 0
    if max_len == 0 or n_seg == 0 or n_rows == 0:
        return torch.zeros_like(q)
    q = q.contiguous()
    block_d = max(16, triton.next_power_of_2(dim))
    block_m = max(16, min(64, triton.next_power_of_2(n_rows)))
    block_n = 64 if block_d <= 128 else 32
    row_blocks = triton.cdiv(n_rows, block_m)
    # enough programs to fill a GPU, but splits of at least a few key blocks
    n_splits = max(1, min(triton.cdiv(max_len, 4 * block_n), triton.cdiv(1024, n_seg * row_blocks)))
    split_size = triton.cdiv(triton.cdiv(max_len, n_splits), block_n) * block_n
    n_splits = triton.cdiv(max_len, split_size)
    out = _alloc(bsz, heads, group, q_len, dim, dtype=q.dtype, device=q.device)
    single = n_splits == 1
    if single:  # no partials: the kernel writes `out` (the scratch pointers are unused)
        acc = m = l = out
    else:
        acc, m, l = split_partials(_alloc, n_seg * n_splits * n_rows, dim, q.device)
    has_hidden = hidden is not None
    hidden_arg = hidden.to(torch.int64).contiguous() if has_hidden else start  # unused pointer when absent
    _ragged_attention_kernel[(n_seg, row_blocks, n_splits)](
        q,
        k_buf,
        v_buf,
        start.contiguous(),
        length.contiguous(),
        hidden_arg,
        acc,
        m,
        l,
        out,
        heads,
        n_rows,
        q_len,
        dim,
        split_size,
        n_splits,
        float(scaling),
        float(softcap or 1.0),
        HAS_HIDDEN=has_hidden,
        HAS_SOFTCAP=softcap is not None,
        IEEE=q.dtype == torch.float32 or _INTERPRETED,
        SINGLE=single,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    if not single:
        block_s = max(2, triton.next_power_of_2(n_splits))
        _merge_splits_kernel[(n_seg, n_rows)](acc, m, l, out, n_rows, n_splits, dim, BLOCK_S=block_s, BLOCK_D=block_d)
    return out
