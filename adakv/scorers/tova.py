"""TOVA scorer (the last token's attention)."""

from __future__ import annotations

import dataclasses

import torch

from .base import ScoreInputs, Scorer, window_attention


class TOVA(Scorer):
    """TOVA: keep what the last prompt token attends to, averaged over the KV group's query heads.

    Oren et al., "Transformers are Multi-State RNNs", 2024 (arXiv:2401.06104).
    s_j = mean_g softmax(q_last^(g) K^T * scaling)_j.

    Deviations from the official code (schwartz-lab-NLP/TOVA): it averages over *all* query heads of the layer,
    so every head keeps the same tokens; here each KV head ranks by its own group's heads (head-wise eviction
    is what this library is for). Like every scorer here, the last ``window`` tokens are kept by rule (TOVA
    keeps only what the scores choose; use ``window=1`` for that).
    """

    name = "tova"

    def __call__(self, inputs: ScoreInputs) -> torch.Tensor:
        last = dataclasses.replace(inputs, window=1)
        return window_attention(last)[:, :, :, 0].mean(2)
