"""TOVA scorer (the last token's attention)."""

from __future__ import annotations

import dataclasses

import torch

from .base import ScoreInputs, Scorer, window_attention


class TOVA(Scorer):
    """TOVA: keep what the last prompt token attends to, averaged over the KV group's query heads.

    Oren et al., "Transformers are Multi-State RNNs", 2024 (arXiv:2401.06104).
    s_j = mean_g softmax(q_last^(g) K^T * scaling)_j.
    """

    name = "tova"

    def __call__(self, inputs: ScoreInputs) -> torch.Tensor:
        last = dataclasses.replace(inputs, window=1)
        return window_attention(last)[:, :, :, 0].mean(2)
