"""Triton block-sparse causal prefill attention (CritiPrefill's kernel).

Same geometry, selection format and result as
:func:`adakv.kernels.block_sparse_reference.block_sparse_attention` (see that module's doc): segments and
blocks aligned to the end of the sequence, per (batch, KV head, segment) a list of selected key blocks or a
``dense`` flag, and every query attending causally to its own segment.

One program computes one tile of ``BLOCK_M`` queries (inside one segment) of one query head, flash-attention
style (online softmax in fp32, exp2): first over the keys before its segment (the gathered selected blocks,
several blocks per ``BLOCK_N`` tile, or the whole prefix when the segment is dense), then over its own segment
(causal mask only on the diagonal tile). K/V are read through the KV head of the query head's group, never
repeated. The selection is read from device tensors (no host sync), and the heaviest tiles (the last ones)
are launched first. Logit softcap, fp16/bf16/fp32, head_dim up to 256 (padded to a power of two).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .block_sparse_reference import check_inputs, geometry
from .triton_softmax import attend_tile

# Triton's CPU interpreter computes half-precision dots wrongly; it gets the exact fp32 path instead.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_alloc = torch.empty  # output allocation; tests swap in a NaN-filled one to catch unwritten elements


@triton.jit
def _block_sparse_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    valid_ptr,
    blocks_ptr,
    dense_ptr,
    sq_b,
    sq_h,
    sq_m,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    so_b,
    so_m,
    so_h,
    n_q_heads,
    group,
    q_len,
    k_len,
    dim,
    pad,
    n_seg,
    n_slots,
    n_tiles,
    tile0,
    qk_scale,
    softcap,
    SEG: tl.constexpr,
    BLK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    tile = n_tiles - 1 - tl.program_id(1)  # last tiles (the longest rows) first
    b = bh // n_q_heads
    h = bh % n_q_heads
    hk = h // group
    n_kv = n_q_heads // group

    v_first = tile0 + tile * BLOCK_M  # virtual position of the tile's first row
    vq = v_first + tl.arange(0, BLOCK_M)
    q_off = k_len - q_len + pad  # virtual position of query 0
    qi = vq - q_off
    row_ok = (qi >= 0) & (qi < q_len)
    seg = v_first // SEG
    seg_v0 = seg * SEG
    sel = (b * n_kv + hk) * n_seg + seg
    dense_flag = tl.load(dense_ptr + sel).to(tl.int32)
    is_dense = dense_flag != 0

    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    b64 = b.to(tl.int64)
    q_base = q_ptr + b64 * sq_b + h.to(tl.int64) * sq_h
    q = tl.load(q_base + qi[:, None].to(tl.int64) * sq_m + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b64 * sk_b + hk.to(tl.int64) * sk_h
    v_base = v_ptr + b64 * sv_b + hk.to(tl.int64) * sv_h
    valid_base = valid_ptr + b64 * k_len

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # 1. keys before the segment: the selected blocks (gathered), or the whole prefix if dense
    n_before = tl.where(is_dense, seg_v0, n_slots * BLK)
    for n0 in range(0, n_before, BLOCK_N):
        slot = n0 + tl.arange(0, BLOCK_N)
        in_range = slot < n_before
        dense_n = (slot * 0 + dense_flag) != 0
        blk = tl.load(blocks_ptr + sel.to(tl.int64) * n_slots + slot // BLK, mask=in_range & (~dense_n), other=-1)
        vk = tl.where(dense_n, slot, blk * BLK + slot % BLK)
        kpos = vk - pad
        kok = in_range & (kpos >= 0) & (kpos < k_len) & (dense_n | (blk >= 0))
        kok = kok & (tl.load(valid_base + kpos, mask=kok, other=0) != 0)
        kv_mask = kok[:, None] & d_ok[None, :]
        k = tl.load(k_base + kpos[:, None].to(tl.int64) * sk_n + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + kpos[:, None].to(tl.int64) * sv_n + d[None, :], mask=kv_mask, other=0.0)
        keep = row_ok[:, None] & kok[None, :]
        m_i, l_i, acc = attend_tile(q, k, v, keep, m_i, l_i, acc, qk_scale, softcap, HAS_SOFTCAP, IEEE)

    # 2. the segment's own keys before this tile (no causal mask needed), then the diagonal tile
    for n0 in range(seg_v0, v_first, BLOCK_N):
        vk = n0 + tl.arange(0, BLOCK_N)
        kpos = vk - pad
        kok = kpos >= 0
        kok = kok & (tl.load(valid_base + kpos, mask=kok, other=0) != 0)
        kv_mask = kok[:, None] & d_ok[None, :]
        k = tl.load(k_base + kpos[:, None].to(tl.int64) * sk_n + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + kpos[:, None].to(tl.int64) * sv_n + d[None, :], mask=kv_mask, other=0.0)
        keep = row_ok[:, None] & kok[None, :]
        m_i, l_i, acc = attend_tile(q, k, v, keep, m_i, l_i, acc, qk_scale, softcap, HAS_SOFTCAP, IEEE)
    for n0 in range(v_first, v_first + BLOCK_M, BLOCK_N):
        vk = n0 + tl.arange(0, BLOCK_N)
        kpos = vk - pad
        kok = (kpos >= 0) & (kpos < k_len)
        kok = kok & (tl.load(valid_base + kpos, mask=kok, other=0) != 0)
        kv_mask = kok[:, None] & d_ok[None, :]
        k = tl.load(k_base + kpos[:, None].to(tl.int64) * sk_n + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + kpos[:, None].to(tl.int64) * sv_n + d[None, :], mask=kv_mask, other=0.0)
        keep = row_ok[:, None] & kok[None, :] & (vk[None, :] <= vq[:, None])
        m_i, l_i, acc = attend_tile(q, k, v, keep, m_i, l_i, acc, qk_scale, softcap, HAS_SOFTCAP, IEEE)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that saw nothing (padding) gives 0
    o_ptrs = o_ptr + b64 * so_b + h.to(tl.int64) * so_h + qi[:, None].to(tl.int64) * so_m + d[None, :]
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _tiles(segment_size: int, dim: int, fp32: bool, interpreted: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M divides the segment."""
    if interpreted:
        block_m, block_n, warps, stages = 64, 32, 1, 1  # the interpreter: fewer, larger numpy steps
    elif dim <= 64 and not fp32:
        block_m, block_n, warps, stages = 128, 64, 4, 3
    elif dim <= 128 and not fp32:
        block_m, block_n, warps, stages = 128, 64, 8, 3
    else:  # head_dim 256, or fp32 (twice the bytes): smaller tiles fit an A100's shared memory too
        block_m, block_n, warps, stages = 64, 32, 4, 2
    while segment_size % block_m:
        block_m //= 2
    return block_m, min(block_n, block_m), warps, stages


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: torch.Tensor,
    dense: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    softcap: float | None,
    segment_size: int,
    block_size: int,
) -> torch.Tensor:
    """Triton version of :func:`adakv.kernels.block_sparse_reference.block_sparse_attention`."""
    bsz, h_q, h_kv, q_len, k_len, dim = check_inputs(q, k, v, blocks, dense, valid)
    if segment_size % 16:
        raise ValueError(f"the Triton block-sparse kernel needs segment_size a multiple of 16, got {segment_size}")
    if dim > 256:
        raise ValueError(f"the Triton block-sparse kernel supports head_dim up to 256, got {dim}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"need query/key/value of one dtype among fp16, bf16, fp32; got {q.dtype}, {k.dtype}")
    geo = geometry(q_len, k_len, segment_size, block_size)
    if dense.shape[2] != geo.n_seg:
        raise ValueError(f"selection has {dense.shape[2]} segments, the geometry {geo.n_seg}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = _alloc(bsz, q_len, h_q, dim, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_m, block_n, warps, stages = _tiles(segment_size, dim, q.dtype == torch.float32, _INTERPRETED)
    q_off = k_len - q_len + geo.pad
    tile0 = q_off // block_m * block_m
    n_tiles = triton.cdiv(k_len + geo.pad - tile0, block_m)
    n_slots = blocks.shape[3]
    blocks_arg = blocks.to(torch.int32).contiguous() if n_slots else dense  # unused pointer without slots
    _block_sparse_kernel[(bsz * h_q, n_tiles)](
        q,
        k,
        v,
        out,
        valid.to(torch.uint8).contiguous(),
        blocks_arg,
        dense.to(torch.uint8).contiguous(),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        h_q,
        h_q // h_kv,
        q_len,
        k_len,
        dim,
        geo.pad,
        geo.n_seg,
        n_slots,
        n_tiles,
        tile0,
        float(scaling),
        float(softcap or 1.0),
        SEG=segment_size,
        BLK=block_size,
        HAS_SOFTCAP=softcap is not None,
        IEEE=q.dtype == torch.float32 or _INTERPRETED,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        num_warps=warps,
        num_stages=stages,
    )
    return out


__all__ = ["block_sparse_attention"]
