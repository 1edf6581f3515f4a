"""Knorm scorer (negative key norm)."""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer


class KeyNorm(Scorer):
    """Knorm: keep keys with a small L2 norm, s_j = -||k_j||_2.

    Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression", EMNLP 2024 (arXiv:2406.11430).
    """

    name = "knorm"

    def __call__(self, inputs: ScoreInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1)
