"""SnapKV scorer."""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer, window_attention
from .pooling import pool_positions


class SnapKV(Scorer):
    """SnapKV: keep what the observation window attends to.

    Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024.

    With A = softmax(Q_win K^T * scaling) over the last w prompt queries (causal
    inside the window, fp32), the score of token j is

        s_j = pool_k( agg_g( (1/w) * sum_i A^g_ij ) ),

    agg_g the mean (or max) over the G query heads g of a KV group, taken *before* the pooling (with max
    pooling the order matters: the group's aggregate is pooled, not each query head's scores),

    where pool_k is a stride-1 1-D max- (default, kernel 7) or average-pool
    (kernel 5 in the paper) over positions outside the window, zero-padded.
    The pooling window is one of token positions (:func:`~adakv.scorers.pooling.pool_positions`): the same
    as the paper's on a contiguous prompt, and still positions once earlier evictions have left gaps (a
    later prompt chunk, a decode-time rescoring), where the official code would pool across the gaps.

    Args:
        pooling: ``"max"`` or ``"avg"``.
        kernel_size: pooling width (odd, >= 1; 1 disables pooling).
        gqa: ``"mean"`` or ``"max"`` over the query heads of a group.
    """

    name = "snapkv"

    def __init__(self, pooling: str = "max", kernel_size: int = 7, gqa: str = "mean"):
        if pooling not in ("max", "avg"):
            raise ValueError(f"SnapKV pooling must be 'max' or 'avg', got {pooling!r}.")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SnapKV kernel_size must be an odd int >= 1, got {kernel_size!r}.")
        if gqa not in ("mean", "max"):
            raise ValueError(f"SnapKV gqa must be 'mean' or 'max', got {gqa!r}.")
        self.pooling = pooling
        self.kernel_size = kernel_size
        self.gqa = gqa

    def __call__(self, inputs: ScoreInputs) -> torch.Tensor:
        attn = window_attention(inputs)  # [B, H, G, w, L]
        scores = attn.mean(3)
        scores = scores.mean(2) if self.gqa == "mean" else scores.amax(2)  # [B, H, L]
        return pool_outside_window(scores, attn.shape[3], self.pooling, self.kernel_size, inputs.positions)


def pool_outside_window(
    scores: torch.Tensor, window: int, pooling: str, kernel_size: int, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Stride-1 pooling of ``scores`` ``[B, H, L]`` over token positions (``positions`` ``[B, H, L]``; None:
    contiguous), as if the last ``window`` columns were cut off (zeros there)."""
    if kernel_size == 1:
        return scores
    seq = scores.shape[-1]
    outside = scores.clone()
    outside[..., max(seq - window, 0) :] = 0.0
    return pool_positions(outside, positions, kernel_size, pooling)
