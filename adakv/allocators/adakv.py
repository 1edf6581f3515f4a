"""Ada-KV head-wise adaptive allocation."""

from __future__ import annotations

import torch

from .base import Allocator, topk_mask


class AdaKV(Allocator):
    """Ada-KV: the KV heads of a layer compete for one shared budget.

    Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
    Allocation for Efficient LLM Inference", NeurIPS 2025 (arXiv:2407.11550).

    For each sequence with per-head budget B and H KV heads: every head first
    keeps its own top ``floor(alpha * B)`` tokens (the safeguard), then the
    remaining ``H * B - H * floor(alpha * B)`` slots go to the highest scores
    over all heads jointly, so head h ends up with B_h tokens, sum_h B_h = H * B.

    Args:
        alpha: safeguard fraction in [0, 1]; 0.2 as in the paper's code
            (alpha = 0 lets a head lose everything and is unstable).
    """

    name = "adakv"

    def __init__(self, alpha: float = 0.2):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"AdaKV alpha must be a number in [0, 1], got {alpha!r}.")
        self.alpha = float(alpha)

    def __call__(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        bsz, heads, seq = scores.shape
        floor_k = torch.floor(budget.double() * self.alpha).long()
        keep = topk_mask(scores.reshape(bsz * heads, seq), floor_k.repeat_interleave(heads)).reshape(bsz, heads, seq)
        rest = (budget - floor_k) * heads
        remaining = scores.masked_fill(keep, float("-inf")).reshape(bsz, heads * seq)
        return keep | topk_mask(remaining, rest).reshape(bsz, heads, seq)
