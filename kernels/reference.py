"""Pure-torch reference implementations of adakv's storage and attention ops.

Layout shared by every op: a layer keeps one flat key buffer and one flat value
buffer, each ``[capacity, head_dim]``. Segment ``(b, h)`` (sequence b, KV head h)
owns rows ``[start[b, h], start[b, h] + cap)`` and its first ``length[b, h]``
rows hold its tokens in position order. ``start`` and ``length`` are int64
tensors of shape ``[batch, kv_heads]`` on the buffers' device.

These run anywhere (CPU included) and define what the fast kernels must
compute; they favour clarity over speed but never loop over heads in Python.
"""

from __future__ import annotations

import torch


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def compact_(
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    start: torch.Tensor,
) -> None:
    """Gather the kept tokens of dense ``keys``/``values`` ``[B, H, L, D]`` into the flat buffers.

    ``keep`` is a bool mask ``[B, H, L]``; segment (b, h) receives its kept tokens in
    position order at rows ``start[b, h], start[b, h] + 1, ...``.
    """
    bsz, heads, seq, dim = keys.shape
    flat_keep = keep.reshape(bsz * heads, seq)
    seg, pos = flat_keep.nonzero(as_tuple=True)  # row-major: by segment, then by position
    counts = flat_keep.sum(-1)
    rank = torch.arange(seg.numel(), device=seg.device) - _exclusive_cumsum(counts)[seg]
    dst = start.reshape(-1)[seg] + rank
    k_buf[dst] = keys.reshape(bsz * heads, seq, dim)[seg, pos]
    v_buf[dst] = values.reshape(bsz * heads, seq, dim)[seg, pos]


def copy_segments_(
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    src_start: torch.Tensor,
    dst_start: torch.Tensor,
    length: torch.Tensor,
) -> None:
    """Copy ``length[s]`` rows of every segment from ``src_start[s]`` to ``dst_start[s]`` (flat to flat)."""
    length = length.reshape(-1)
    seg = torch.repeat_interleave(torch.arange(length.numel(), device=length.device), length)
    rank = torch.arange(seg.numel(), device=seg.device) - _exclusive_cumsum(length)[seg]
    src = src_start.reshape(-1)[seg] + rank
    dst = dst_start.reshape(-1)[seg] + rank
    dst_k[dst] = src_k[src]
    dst_v[dst] = src_v[src]


def append_(
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> None:
    """Write new tokens ``[B, H, Q, D]`` right after each segment's current tokens.

    ``valid`` (bool ``[B, Q]``) drops tokens (padding) from the write: the valid
    tokens of row b are stored contiguously in order. Capacity must already
    suffice; ``length`` is not modified (the caller owns it).
    """
    bsz, heads, q_len, dim = new_k.shape
    end = start + length  # [B, H]: the first free row of every segment
    if valid is None:
        # index_copy_ (rows are distinct): a decoded token costs three small ops per layer, not an index_put's setup
        dst = end.reshape(-1) if q_len == 1 else (end[:, :, None] + torch.arange(q_len, device=end.device)).reshape(-1)
        k_buf.index_copy_(0, dst, new_k.reshape(-1, dim))
        v_buf.index_copy_(0, dst, new_v.reshape(-1, dim))
        return
    dst = end[:, :, None] + (torch.cumsum(valid.long(), -1) - 1)[:, None, :]  # [B, H, Q]
    sel = valid[:, None, :].expand(bsz, heads, q_len)
    k_buf[dst[sel]] = new_k[sel]
    v_buf[dst[sel]] = new_v[sel]


def ragged_attention_probs(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    hidden: torch.Tensor | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """The attention probabilities of :func:`ragged_attention`, fp32 ``[B, H, G, Q, M]`` over each segment's
    first M = ``max_len`` rows (0 where a query sees nothing: past the segment's end, or hidden from it)."""
    bsz, heads, group, q_len, dim = q.shape
    if hidden is None:
        hidden = (q_len - 1 - torch.arange(q_len, device=q.device)).expand(bsz, q_len)
    visible = length[:, :, None] - hidden[:, None, :]  # [B, H, Q]
    if max_len is None:
        max_len = int(length.max()) if length.numel() else 0
    offs = torch.arange(max_len, device=q.device)
    idx = (start[:, :, None] + offs).clamp_(max=max(k_buf.shape[0] - 1, 0))  # [B, H, M]
    inside = offs[None, None, :] < length[:, :, None]  # rows past a segment's end hold garbage (maybe NaN)
    keys = k_buf[idx].float().masked_fill(~inside[..., None], 0.0)
    logits = torch.einsum("bhgqd,bhmd->bhgqm", q.float(), keys) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    seen = offs[None, None, None, :] < visible[:, :, :, None]  # [B, H, Q, M]
    logits = logits.masked_fill(~seen[:, :, None], float("-inf"))
    return torch.softmax(logits, -1).nan_to_num(0.0)  # rows with nothing visible -> 0


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
) -> torch.Tensor:
    """Attention of ``q`` ``[B, H, G, Q, D]`` over the ragged segments; returns ``[B, H, G, Q, D]``.

    The G query heads of a group share their KV segment (GQA without repeating K/V).
    Query i of row b sees the first ``length[b, h] - hidden[b, i]`` tokens of each
    segment; the default ``hidden[b, i] = Q - 1 - i`` is causal attention aligned
    bottom-right (the Q queries are the last Q tokens). A query that sees no
    token outputs zeros. Softmax runs in fp32; the result has q's dtype.
    ``max_len`` (the longest segment, if the caller knows it) saves a device sync.
    """
    if max_len is None:
        max_len = int(length.max()) if length.numel() else 0
    if max_len == 0:
        return torch.zeros_like(q)
    probs = ragged_attention_probs(q, k_buf, start, length, scaling, softcap, hidden, max_len)
    offs = torch.arange(max_len, device=q.device)
    idx = (start[:, :, None] + offs).clamp_(max=v_buf.shape[0] - 1)
    inside = offs[None, None, :] < length[:, :, None]
    values = v_buf[idx].float().masked_fill(~inside[..., None], 0.0)
    out = torch.einsum("bhgqm,bhmd->bhgqd", probs, values)
    return out.to(q.dtype)
