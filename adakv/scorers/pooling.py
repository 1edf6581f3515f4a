"""Stride-1 pooling of per-token scores over token *positions*, not columns."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_positions(x: torch.Tensor, positions: torch.Tensor | None, kernel_size: int, mode: str) -> torch.Tensor:
    """Pool ``x`` ``[..., L]`` along its last axis over a window of ``kernel_size`` token positions.

    SnapKV and DefensiveKV pool a token's score with its neighbours' so that a whole span (a multi-token number)
    survives when one of its tokens is attended. Their code pools along columns, which are positions only while
    the tokens are contiguous: once a chunked prefill or a decode-time rescoring has evicted tokens, a layer's
    held tokens are gapped and each head holds different ones, and neighbouring columns may be far apart in the
    text. Here column j gathers the columns whose position p satisfies ``|p - p_j| <= kernel_size // 2``; an
    absent position (evicted, padding, outside the sequence) counts as a zero, as zero padding does, and
    ``"avg"`` divides by ``kernel_size`` (``count_include_pad``). On contiguous positions this is exactly
    ``avg_pool1d`` / ``max_pool1d`` with zero padding.

    ``positions``: int ``[..., L]`` broadcastable to ``x``, increasing along L over the real tokens, < 0 at
    padding (padding columns neither gather nor are gathered: they come out 0); None: contiguous.
    ``mode``: ``"avg"`` or ``"max"``.
    """
    if mode not in ("avg", "max"):
        raise ValueError(f"pooling mode must be 'avg' or 'max', got {mode!r}.")
    radius = kernel_size // 2
    if radius == 0:
        return x
    seq = x.shape[-1]
    if positions is None:
        positions = torch.arange(seq, device=x.device)
    # positions increase along the columns, so a neighbour within `radius` positions is within `radius` columns
    pos = F.pad(positions, (radius, radius), value=-(1 << 40))
    val = F.pad(x, (radius, radius))
    out = None
    for shift in range(2 * radius + 1):
        other = pos[..., shift : shift + seq]
        near = (other >= 0) & (positions >= 0) & ((other - positions).abs() <= radius)
        term = val[..., shift : shift + seq].masked_fill(~near, 0.0)
        if out is None:
            out = term
        elif mode == "avg":
            out = out + term
        else:
            out = torch.maximum(out, term)
    return out / kernel_size if mode == "avg" else out
