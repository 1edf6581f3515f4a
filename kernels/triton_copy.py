"""Triton copies into the ragged storage: a row copy behind compaction and segment re-layout, and an append kernel.

Each writes K and V rows (``head_dim`` contiguous elements) from a source to a flat buffer at computed rows, K and V
in one launch. The row copy's index vectors are built with a few torch ops on the device (no host sync, except in
``copy_segments_``: the number of rows a re-layout moves sizes its index vector); the append kernel computes its
rows from the segments' starts and lengths itself.
Reference: :mod:`adakv.kernels.reference` (``compact_``, ``append_``, ``copy_segments_``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_rows_kernel(
    src_k,
    src_v,
    src_off_k,
    src_off_v,  # element offsets of each source row (K and V may differ in strides)
    dst_k,
    dst_v,
    dst_row,
    n_rows,
    dim,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    dst = tl.load(dst_row + rows, mask=rows < n_rows, other=-1)
    row_ok = dst >= 0  # a row with destination -1 is skipped
    mask = row_ok[:, None] & (cols[None, :] < dim)
    sk = tl.load(src_off_k + rows, mask=row_ok, other=0)
    sv = tl.load(src_off_v + rows, mask=row_ok, other=0)
    d = dst * dim
    k = tl.load(src_k + sk[:, None] + cols[None, :], mask=mask)
    v = tl.load(src_v + sv[:, None] + cols[None, :], mask=mask)
    tl.store(dst_k + d[:, None] + cols[None, :], k, mask=mask)
    tl.store(dst_v + d[:, None] + cols[None, :], v, mask=mask)


def copy_rows_(
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    dst_row: torch.Tensor,
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    src_off_k: torch.Tensor,
    src_off_v: torch.Tensor,
) -> None:
    """``dst[dst_row[i]] = src.flatten()[src_off[i] : src_off[i] + dim]`` for K and V, one launch; rows with
    ``dst_row[i] == -1`` are skipped."""
    n_rows, dim = dst_row.numel(), dst_k.shape[-1]
    if n_rows == 0:
        return
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, min(64, 4096 // block_d))
    grid = (triton.cdiv(n_rows, block_r),)
    _copy_rows_kernel[grid](
        src_k, src_v, src_off_k, src_off_v, dst_k, dst_v, dst_row, n_rows, dim, BLOCK_R=block_r, BLOCK_D=block_d
    )


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def _dense_offsets(t: torch.Tensor, b: torch.Tensor, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        raise ValueError("adakv's Triton kernels need the head_dim axis contiguous (stride 1).")
    return b * t.stride(0) + h * t.stride(1) + pos * t.stride(2)


def compact_(k_buf, v_buf, keys, values, keep, start) -> None:
    """Triton version of :func:`adakv.kernels.reference.compact_`. Every (segment, position) is a row of the
    launch and the evicted ones are skipped in the kernel: no ``nonzero``, whose data-dependent size would make
    the host wait for the device."""
    bsz, heads, seq, _ = keys.shape
    flat_keep = keep.reshape(bsz * heads, seq)
    rank = torch.cumsum(flat_keep, -1) - 1  # a kept token's row in its segment
    dst = torch.where(flat_keep, start.reshape(-1, 1) + rank, -1).reshape(-1)
    device = keys.device
    b = torch.arange(bsz, device=device)[:, None, None]
    h = torch.arange(heads, device=device)[None, :, None]
    pos = torch.arange(seq, device=device)[None, None, :]
    src_k = _dense_offsets(keys, b, h, pos).expand(bsz, heads, seq).reshape(-1)
    src_v = _dense_offsets(values, b, h, pos).expand(bsz, heads, seq).reshape(-1)
    copy_rows_(k_buf, v_buf, dst, keys, values, src_k, src_v)


def copy_segments_(dst_k, dst_v, src_k, src_v, src_start, dst_start, length) -> None:
    """Triton version of :func:`adakv.kernels.reference.copy_segments_`."""
    length = length.reshape(-1)
    seg = torch.repeat_interleave(torch.arange(length.numel(), device=length.device), length)
    rank = torch.arange(seg.numel(), device=seg.device) - _exclusive_cumsum(length)[seg]
    src = (src_start.reshape(-1)[seg] + rank) * src_k.shape[-1]
    copy_rows_(dst_k, dst_v, dst_start.reshape(-1)[seg] + rank, src_k, src_v, src, src)


@triton.jit
def _append_kernel(
    new_k,
    new_v,
    k_stride_b,
    k_stride_h,
    k_stride_q,
    v_stride_b,
    v_stride_h,
    v_stride_q,
    k_buf,
    v_buf,
    start_ptr,
    length_ptr,
    rank_ptr,
    heads,
    q_len,
    dim,
    HAS_RANK: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Segment (b, h) receives its new tokens right after its current ones: all index math in the kernel,
    so a decoding step costs one launch. ``rank[b, q]`` (with padding) is the slot of token q, -1 = skip."""
    seg = tl.program_id(0).to(tl.int64)  # b * stride_b can pass 2^31 for a long chunk of a large batch
    b = seg // heads
    h = seg % heads
    qs = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qs < q_len
    if HAS_RANK:
        rank = tl.load(rank_ptr + b * q_len + qs, mask=q_ok, other=-1)
        q_ok = q_ok & (rank >= 0)
    else:
        rank = qs
    base = tl.load(start_ptr + seg) + tl.load(length_ptr + seg)
    cols = tl.arange(0, BLOCK_D)
    mask = q_ok[:, None] & (cols[None, :] < dim)
    dst = (base + rank)[:, None] * dim + cols[None, :]
    q64 = qs[:, None].to(tl.int64)
    k = tl.load(new_k + b * k_stride_b + h * k_stride_h + q64 * k_stride_q + cols[None, :], mask=mask)
    v = tl.load(new_v + b * v_stride_b + h * v_stride_h + q64 * v_stride_q + cols[None, :], mask=mask)
    tl.store(k_buf + dst, k, mask=mask)
    tl.store(v_buf + dst, v, mask=mask)


def append_(k_buf, v_buf, new_k, new_v, start, length, valid=None) -> None:
    """Triton version of :func:`adakv.kernels.reference.append_` (one launch, no host sync, when ``valid``
    is None)."""
    bsz, heads, q_len, dim = new_k.shape
    if new_k.stride(-1) != 1 or new_v.stride(-1) != 1:
        raise ValueError("adakv's Triton kernels need the head_dim axis contiguous (stride 1).")
    rank = start  # unused pointer without padding
    if valid is not None:
        rank = torch.where(valid, torch.cumsum(valid.long(), -1) - 1, -1)
    block_d = triton.next_power_of_2(dim)
    block_q = max(1, min(triton.next_power_of_2(q_len), 4096 // block_d))
    _append_kernel[(bsz * heads, triton.cdiv(q_len, block_q))](
        new_k,
        new_v,
        *new_k.stride()[:3],
        *new_v.stride()[:3],
        k_buf,
        v_buf,
        start.contiguous(),
        length.contiguous(),
        rank,
        heads,
        q_len,
        dim,
        HAS_RANK=valid is not None,
        BLOCK_Q=block_q,
        BLOCK_D=block_d,
    )
