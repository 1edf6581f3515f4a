"""Ada-KV head-wise adaptive allocation."""

from __future__ import annotations

import torch

from .base import Allocator, check_alpha, safeguarded


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

    The safeguard follows the authors' kvpress implementation (AdaKVPress: floor(alpha * B) per head, the window
    inside it, then a joint top-k). Their earlier repository (FFY0/AdaKV) mixes instead:
    B_h = round((1 - alpha) * B_h^ada + alpha * (B - w)), which protects alpha * (B - w) tokens outside the
    window; with w = 32 and B <= 160 the kvpress form protects nothing beyond the window.
    """

    name = "adakv"

    def __init__(self, alpha: float = 0.2):
        self.alpha = check_alpha("AdaKV", alpha)

    def __call__(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        floor_k = torch.floor(budget.double() * self.alpha).long() if self.alpha else None
        return safeguarded([scores], floor_k, budget * scores.shape[1])[0]
