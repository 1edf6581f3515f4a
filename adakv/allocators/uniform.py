"""Uniform allocation."""

from __future__ import annotations

import torch

from .base import Allocator, topk_mask


class Uniform(Allocator):
    """Every KV head keeps its own top ``budget`` tokens (SnapKV, H2O, ... as published)."""

    name = "uniform"

    def __call__(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        bsz, heads, seq = scores.shape
        k = budget.repeat_interleave(heads)
        return topk_mask(scores.reshape(bsz * heads, seq), k).reshape(bsz, heads, seq)
