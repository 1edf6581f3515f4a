"""One launch per layer per decoded token: append the new K/V row, attend, merge the splits, advance the lengths.

The unfused decode step is an append launch (``triton_copy.append_``), an attention launch and a split-merge
launch (``triton_attention``), plus a torch op advancing ``length``. Here one grid of ``(segments, splits)``
programs does all of it:

- program (s, j) attends with the G query heads of segment s's group over rows ``[j * split, (j + 1) * split)``
  of the segment's *old* tokens, read from the flat buffers (``triton_softmax.attend_tile``: online softmax,
  fp32, log2 units);
- the program whose split holds row ``length[s]`` (the new token's row) also takes the new token's key and value
  from the step's ``new_k`` / ``new_v``, adds its logit to the softmax from registers, and writes the row into
  the buffers. No other program reads that row, so there is no read-after-write race;
- with one split the program normalizes and writes the output; with several, each stores its partial (m, l,
  acc), then increments the segment's counter (an acq_rel atomic); the program that sees ``splits - 1`` is the
  last: it merges the partials with their log-sum-exp, writes the output, resets the counter to 0 (ready for the
  next step, or a CUDA graph replay) and advances ``length[s]`` by one, after every program of the segment has
  read it (each read happens before its own atomic).

The grid comes from ``max_len`` only: give a fixed width (the widest segment's capacity) and it is the same at
every step; programs whose split lies past their segment exit the loop at once. Every per-step quantity lives
on the device, so the launch is CUDA-graph capturable. Reference: :func:`adakv.kernels.reference.append_` then
``length += 1`` then :func:`adakv.kernels.reference.ragged_attention` (``Q = 1``, no hidden tokens).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .triton_softmax import attend_tile, check_rows, log2_logits, split_partials

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # its half-precision dots are wrong: exact fp32 instead
_alloc = torch.empty  # scratch allocation; tests swap in a NaN-filled one to catch unwritten elements
MAX_GROUP = 128  # query heads per KV head the single row block holds; larger groups take the unfused path


@triton.jit
def _decode_kernel(
    q_ptr,
    nk_ptr,
    nv_ptr,
    k_ptr,
    v_ptr,
    start_ptr,
    length_ptr,
    count_ptr,
    acc_ptr,
    m_ptr,
    l_ptr,
    out_ptr,
    heads,
    group,
    dim,
    nk_sb,
    nk_sh,
    nv_sb,
    nv_sh,
    split_size,
    n_splits,
    scaling,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    IEEE: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    seg = tl.program_id(0)
    split = tl.program_id(1)
    seg_start = tl.load(start_ptr + seg)
    old = tl.load(length_ptr + seg)  # tokens before this step; the new one goes to row `old`
    b = seg // heads
    h = seg - b * heads

    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < group
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < dim
    out_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + (seg * group + rows)[:, None] * dim + cols_d[None, :], mask=out_mask, other=0.0)

    lo = split * split_size
    hi = tl.minimum(lo + split_size, old)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        kv_off = (seg_start + cols).to(tl.int64)[:, None] * dim + cols_d[None, :]
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        m_i, l_i, acc = attend_tile(q, k, v, col_ok[None, :], m_i, l_i, acc, scaling, softcap, HAS_SOFTCAP, IEEE)

    if split == old // split_size:  # this split's range holds the new token's row
        k_new = tl.load(nk_ptr + b * nk_sb + h * nk_sh + cols_d, mask=d_ok, other=0.0)
        v_new = tl.load(nv_ptr + b * nv_sb + h * nv_sh + cols_d, mask=d_ok, other=0.0)
        dots = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1)
        logit = log2_logits(dots, scaling, softcap, HAS_SOFTCAP)
        m_new = tl.maximum(m_i, logit)  # finite: the new token is visible to every query
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(logit - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new
        row = (seg_start + old).to(tl.int64) * dim
        tl.store(k_ptr + row + cols_d, k_new, mask=d_ok)
        tl.store(v_ptr + row + cols_d, v_new, mask=d_ok)

    dst = out_ptr + (seg * group + rows)[:, None] * dim + cols_d[None, :]
    if SINGLE:  # the only program of its segment: finish here (every row saw the new token, so l > 0)
        tl.store(dst, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
        tl.store(length_ptr + seg, old + 1)
    else:
        part = (seg * n_splits + split) * group + rows
        tl.store(m_ptr + part, m_i, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)
        tl.store(acc_ptr + part.to(tl.int64)[:, None] * dim + cols_d[None, :], acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is stored before the release below
        done = tl.atomic_add(count_ptr + seg, 1, sem="acq_rel", scope="gpu")
        if done == n_splits - 1:  # the last program of the segment: merge (partials read past L1)
            splits = tl.arange(0, BLOCK_S)
            s_ok = splits < n_splits
            for r in range(0, group):
                at = (seg * n_splits + splits) * group + r
                m = tl.load(m_ptr + at, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
                l = tl.load(l_ptr + at, mask=s_ok, other=0.0, cache_modifier=".cg")
                m_max = tl.max(m, 0)  # finite: the split holding the new token saw it
                weight = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
                parts = tl.load(
                    acc_ptr + at.to(tl.int64)[:, None] * dim + cols_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :],
                    other=0.0,
                    cache_modifier=".cg",
                )
                o = tl.sum(parts * weight[:, None], 0) / tl.sum(l * weight, 0)
                tl.store(out_ptr + (seg * group + r) * dim + cols_d, o.to(out_ptr.dtype.element_ty), mask=d_ok)
            tl.store(count_ptr + seg, 0)
            tl.store(length_ptr + seg, old + 1)


@functools.cache
def _programs_per_wave(device: torch.device) -> int:
    """Programs that fill the device once: one per SM (the interpreter gets 16, so that tests split)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 16


def split_plan(n_seg: int, max_len: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """``(n_splits, split_size)`` for ``n_seg`` segments of at most ``max_len`` rows: the fewest whole waves of
    programs that give every program at least four key blocks, and a split size in whole key blocks."""
    wave = _programs_per_wave(device)
    most = max(1, triton.cdiv(max_len, 4 * block_n))  # more splits would each get fewer than four blocks
    waves = max(1, triton.cdiv(n_seg, wave))  # whole waves: a last partial wave costs as much as a full one
    n_splits = max(1, min(most, (waves * wave) // n_seg))
    split_size = triton.cdiv(triton.cdiv(max_len, n_splits), block_n) * block_n
    return triton.cdiv(max_len, split_size), split_size


def decode_(
    q: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    counters: torch.Tensor,
    scaling: float,
    softcap: float | None,
    max_len: int,
) -> torch.Tensor:
    """One decoded token per segment: ``q`` ``[B, H, G, 1, D]``, its new ``new_k`` / ``new_v`` ``[B, H, 1, D]``.

    Writes the new rows at ``start + length``, advances ``length`` (int64 ``[B, H]``) by one and returns the
    attention ``[B, H, G, 1, D]`` over every segment's tokens, the new one included. Every segment must have a
    free row. ``counters``: int32 ``[B * H]`` zeros, owned by the caller and left at zero. ``max_len`` sizes the
    grid and must be >= the longest segment after the append (a fixed value, e.g. the widest capacity, gives
    the same launch at every step); it is not checked (that would read the lengths on the host): a smaller one
    leaves the new row of a longer segment unwritten while its length still advances. The buffers must be
    contiguous ``[rows, D]`` (checked)."""
    if torch.compiler.is_compiling():  # traced: the registered op, opaque to dynamo, its mutations declared
        return torch.ops.adakv.decode_(
            q, new_k, new_v, k_buf, v_buf, start, length, counters, float(scaling), softcap, int(max_len)
        )
    return _launch(q, new_k, new_v, k_buf, v_buf, start, length, counters, scaling, softcap, max_len)


def _launch(q, new_k, new_v, k_buf, v_buf, start, length, counters, scaling, softcap, max_len) -> torch.Tensor:
    bsz, heads, group, q_len, dim = q.shape
    if q_len != 1 or group > MAX_GROUP:
        raise ValueError(f"decode_ takes one query token and at most {MAX_GROUP} query heads per KV head")
    n_seg = bsz * heads
    if n_seg == 0:
        return torch.zeros_like(q)
    if new_k.stride(-1) != 1 or new_v.stride(-1) != 1:
        raise ValueError("decode_: new_k / new_v need a contiguous last dimension")
    check_rows(k_buf, v_buf, dim)
    q = q.contiguous()
    block_d = max(16, triton.next_power_of_2(dim))
    block_m = max(16, triton.next_power_of_2(group))
    block_n = 64 if block_d <= 128 else 32
    n_splits, split_size = split_plan(n_seg, max(max_len, 1), block_n, q.device)
    out = _alloc(bsz, heads, group, q_len, dim, dtype=q.dtype, device=q.device)
    single = n_splits == 1
    if single:
        acc = m = l = out  # unused pointers
    else:
        acc, m, l = split_partials(_alloc, n_seg * n_splits * group, dim, q.device)
    _decode_kernel[(n_seg, n_splits)](
        q,
        new_k,
        new_v,
        k_buf,
        v_buf,
        start,
        length,
        counters,
        acc,
        m,
        l,
        out,
        heads,
        group,
        dim,
        new_k.stride(0),
        new_k.stride(1),
        new_v.stride(0),
        new_v.stride(1),
        split_size,
        n_splits,
        float(scaling),
        float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None,
        IEEE=q.dtype == torch.float32 or _INTERPRETED,
        SINGLE=single,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_S=max(2, triton.next_power_of_2(n_splits)),
    )
    return out


# Registered for torch.compile: eager calls skip the dispatcher (its overhead would count at every layer and token).
@torch.library.custom_op("adakv::decode_", mutates_args=("k_buf", "v_buf", "length", "counters"))
def _decode_op(
    q: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    counters: torch.Tensor,
    scaling: float,
    softcap: float | None,
    max_len: int,
) -> torch.Tensor:
    return _launch(q, new_k, new_v, k_buf, v_buf, start, length, counters, scaling, softcap, max_len)


@_decode_op.register_fake
def _(q, new_k, new_v, k_buf, v_buf, start, length, counters, scaling, softcap, max_len) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


__all__ = ["MAX_GROUP", "decode_", "split_plan"]
