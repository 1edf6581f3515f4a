"""Random scorer (the baseline)."""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer


class Random(Scorer):
    """Random scores: the baseline every method must beat. ``seed`` makes it reproducible."""

    name = "random"

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Random seed must be an int, got {seed!r}.")
        self.seed = seed

    def __call__(self, inputs: ScoreInputs) -> torch.Tensor:
        bsz, heads, seq, _ = inputs.keys.shape
        gen = torch.Generator().manual_seed(self.seed)
        return torch.rand(bsz, heads, seq, generator=gen).to(inputs.keys.device)
