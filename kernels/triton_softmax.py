"""The online-softmax step every adakv attention kernel shares (flash-attention style, fp32, exp2).

``m`` is the running row maximum and ``l`` the running sum of ``exp2(logit - m)``, both in log2 units (logits
times log2(e)), so partial results merged elsewhere (split-K) must merge with ``exp2`` as well.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl


def check_rows(k_buf: torch.Tensor, v_buf: torch.Tensor, dim: int) -> None:
    """The kernels address row r of a buffer at ``r * dim``: refuse a buffer laid out otherwise (a view of a wider
    one), which they would read wrongly without a word. It runs at every decode step: two comparisons per buffer
    (strides ``(dim, 1)`` imply a 2-D buffer; the width is checked apart, a narrower view can have those strides)."""
    for name, buf in (("k_buf", k_buf), ("v_buf", v_buf)):
        if buf.stride() != (dim, 1) or buf.shape[-1] != dim:
            raise ValueError(
                f"{name} must be a contiguous [rows, {dim}] buffer, got shape {tuple(buf.shape)} "
                f"with strides {buf.stride()}"
            )


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def log2_logits(s, qk_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw dot products ``s`` -> scaled (and soft-capped: softcap * tanh(s * scale / softcap)) logits, in log2
    units. The scalars are cast to fp32 first: torch.compile (inductor, torch 2.11) passes a Python float kernel
    argument as fp64, which would turn the whole tile fp64 (and the online softmax's loop-carried fp32 state with it:
    a compile error)."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # (tl.cast: under the interpreter the scalars are Python floats)
    softcap = tl.cast(softcap, tl.float32)
    if HAS_SOFTCAP:
        x = s * (qk_scale / softcap)
        return softcap * LOG2E * (2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0)  # tanh(x) from one exp
    return s * (qk_scale * LOG2E)


@triton.jit
def attend_tile(
    q,
    k,
    v,
    keep,
    m_i,
    l_i,
    acc,
    qk_scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One online-softmax step of a query tile ``[M, D]`` over one key/value tile ``[N, D]`` (``keep``: bool, a
    mask broadcastable to ``[M, N]``); returns the new ``(m, l, acc)``. ``IEEE``: exact fp32 dots (fp32 inputs,
    and the CPU interpreter, whose half-precision dots are wrong)."""
    if IEEE:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(keep, log2_logits(s, qk_scale, softcap, HAS_SOFTCAP), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet stays at 0 / 0
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


def split_partials(alloc: Callable[..., torch.Tensor], parts: int, dim: int, device: torch.device):
    """Scratch for ``parts`` split-K partial rows: ``(acc [parts * dim], m [parts], l [parts])``, fp32, carved from
    one ``alloc`` call (each allocation costs host time per decoded token). ``alloc``: the calling kernel module's
    allocator (tests swap in a NaN-filled one)."""
    scratch = alloc(parts * (dim + 2), dtype=torch.float32, device=device)
    return scratch[: parts * dim], scratch[parts * dim : parts * (dim + 1)], scratch[parts * (dim + 1) :]
