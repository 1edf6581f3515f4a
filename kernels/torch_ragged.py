"""Ragged attention in plain torch without a padded copy of the cache (the ``torch`` backend, CPU decode).

:func:`adakv.kernels.reference.ragged_attention` gathers every segment into a padded ``[B, H, longest, D]``
fp32 copy at every call, which Ada-KV's uneven heads make expensive. Here each segment is read in place: a
narrow view ``k_buf[start:start + n]`` (no copy), one matmul for its G x Q queries, an fp32 softmax and a
matmul with the value view written straight into the output. Consecutive segments of equal length whose
starts are equally spaced (a uniform allocation: SnapKV, StreamingLLM, ...) form a run read through one
strided view and computed with one batched matmul.

The segment metadata is read on the host: pass ``host_start`` / ``host_length`` (the storage's host copies)
to avoid reading the tensors; on CPU reading them costs no sync either way. Buffers in a low-precision dtype
are converted to fp32 per segment, or per run of equal segments (with a uniform allocation that is the whole
layer at once: a transient fp32 copy of the layer's K/V).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import reference


def _host_ints(x: torch.Tensor | Sequence[int], n: int) -> list[int]:
    if isinstance(x, torch.Tensor):
        values = x.reshape(-1).tolist()  # a CPU tensor: no sync (the cache passes host copies anyway)
    else:
        values = [int(v) for v in x]
    if len(values) != n:
        raise ValueError(f"expected {n} segment entries, got {len(values)}")
    return values


def _strided(buf: torch.Tensor, first: int, count: int, stride: int, rows: int) -> torch.Tensor:
    """``[count, rows, D]`` view of ``buf``: segment j is rows ``first + j * stride ... + rows``."""
    row, col = buf.stride()
    return buf.as_strided((count, rows, buf.shape[1]), (stride * row, row, col), buf.storage_offset() + first * row)


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
    host_start: torch.Tensor | Sequence[int] | None = None,
    host_length: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Same contract as :func:`adakv.kernels.reference.ragged_attention`: ``q`` ``[B, H, G, Q, D]`` over the
    segments of the flat ``[capacity, D]`` buffers; query i of row b sees the first ``length - hidden[b, i]``
    tokens of each of its segments (default ``hidden[b, i] = Q - 1 - i``); a query that sees nothing outputs
    zeros; fp32 softmax; the result has q's dtype. ``max_len`` is accepted for compatibility (unused: every
    segment reads exactly its own rows). ``host_start`` / ``host_length``: host copies of ``start`` /
    ``length`` (tensors or int sequences, ``B * H`` entries in row-major order), read instead of the tensors."""
    if torch.is_grad_enabled() and (q.requires_grad or k_buf.requires_grad or v_buf.requires_grad):
        # it writes into its output in place (out=): let autograd see the reference instead
        return reference.ragged_attention(q, k_buf, v_buf, start, length, scaling, softcap, hidden, max_len)
    bsz, heads, group, q_len, dim = q.shape
    n_seg = bsz * heads
    rows = group * q_len
    out = torch.empty(n_seg, rows, dim, dtype=torch.float32, device=q.device)
    if n_seg == 0 or rows == 0:
        return out.view(q.shape).to(q.dtype)
    starts = _host_ints(start if host_start is None else host_start, n_seg)
    lengths = _host_ints(length if host_length is None else host_length, n_seg)
    if hidden is None:
        hid_rows = [list(range(q_len - 1, -1, -1))] * bsz  # causal, aligned bottom-right
    else:
        hid_rows = hidden.reshape(bsz, q_len).tolist()
    hid_min = [min(h) for h in hid_rows]
    # the scaling goes on the queries once (fp32, one small op), not on every segment's logits
    qs = (q.float() * scaling).reshape(n_seg, rows, dim)
    upcast = k_buf.dtype != torch.float32

    seg = 0
    while seg < n_seg:
        b = seg // heads
        n = lengths[seg] - hid_min[b]  # rows any query of the segment sees: only these are read
        if n <= 0:  # nothing visible to any query of this segment
            out[seg].zero_()
            seg += 1
            continue
        # a run: the following segments of the same sequence row hidden pattern, same rows read, equal spacing
        count, stride = 1, 0
        while seg + count < n_seg:
            nxt = seg + count
            if lengths[nxt] - hid_min[nxt // heads] != n or hid_rows[nxt // heads] != hid_rows[b]:
                break
            gap = starts[nxt] - starts[nxt - 1]
            if count == 1:
                stride = gap
            if gap != stride or gap < 0:
                break
            count += 1
        first = starts[seg]
        if count == 1:
            keys, values = k_buf[first : first + n], v_buf[first : first + n]
            if upcast:
                keys, values = keys.float(), values.float()
            logits = torch.mm(qs[seg], keys.t())  # [G * Q, n]
        else:
            keys, values = _strided(k_buf, first, count, stride, n), _strided(v_buf, first, count, stride, n)
            if upcast:
                keys, values = keys.float(), values.float()
            logits = torch.bmm(qs[seg : seg + count], keys.transpose(1, 2))  # [count, G * Q, n]
        if softcap is not None:
            logits.div_(softcap).tanh_().mul_(softcap)
        visible = [lengths[seg] - h for h in hid_rows[b]]  # per query; equal for every segment of the run
        if min(visible) < n:  # some query sees fewer rows than were read: mask the rest
            limit = torch.tensor(visible, device=q.device)
            hide = torch.arange(n, device=q.device) >= limit[:, None]  # [Q, n]
            logits.view(-1, group, q_len, n).masked_fill_(hide, float("-inf"))
        probs = torch.softmax(logits, -1)
        if min(visible) <= 0:
            probs.nan_to_num_(0.0)  # queries that see nothing: a row of -inf gave NaN
        if count == 1:
            torch.mm(probs, values, out=out[seg])
        else:
            torch.bmm(probs, values, out=out[seg : seg + count])
        seg += count
    return out.view(q.shape).to(q.dtype)


__all__ = ["ragged_attention"]
