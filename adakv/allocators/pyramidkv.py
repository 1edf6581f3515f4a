"""PyramidKV layer-wise budgets."""

from __future__ import annotations

import torch

from .base import Allocator, CrossLayerAllocator
from .uniform import Uniform


class PyramidKV(Allocator):
    """PyramidKV: lower layers keep more tokens than upper ones, linearly in depth.

    Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
    Information Funneling", 2024 (arXiv:2406.02069).

    With per-head budget B (window w included) over n layers, and b = B - w:
    the bottom layer gets b_max = 2b - b_min and the top one b_min = b / beta
    (b_max capped at the prompt length, b_min raised to match); layer l gets
    w + b_max - l * (b_max - b_min) / (n - 1), so the average over
    layers stays B exactly (per-layer rounding is carried over; a float budget's floor of the scorer's pinned
    tokens, :meth:`adakv.selection.Selection.per_head`, can raise a top layer past its share when the window is
    under 4). A prompt of fewer than 2b tokens gets B in
    every layer, as in the official code (KVCache-Factory). Inside a layer, ``heads`` allocates
    (uniform in the paper; ``PyramidKV(AdaKV())`` is the head-adaptive variant).

    Args:
        beta: ratio of the mean to the top layer's non-window budget (20 in the paper).
        heads: the within-layer allocator.
    """

    name = "pyramidkv"

    def __init__(self, beta: float = 20.0, heads: Allocator | None = None):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 1:
            raise ValueError(f"PyramidKV beta must be a number >= 1, got {beta!r}.")
        self.beta = float(beta)
        if heads is not None and (
            not isinstance(heads, Allocator) or isinstance(heads, (CrossLayerAllocator, PyramidKV))
        ):
            raise TypeError(
                f"PyramidKV heads must be a per-layer Allocator instance (e.g. adakv.AdaKV(), adakv.Uniform()), got "
                f"{heads!r}: PyramidKV fixes each layer's budget, so a cross-layer split (or an inner PyramidKV's "
                "schedule) would be dropped."
            )
        self.heads = heads if heads is not None else Uniform()

    def layer_budget(
        self, budget: torch.Tensor, n_valid: torch.Tensor, layer: int, num_layers: int, window: int
    ) -> torch.Tensor:
        if num_layers < 2:
            return budget
        win = budget.clamp(max=window)
        rest = (budget - win).double()
        high = 2 * rest - rest / self.beta
        high = torch.minimum(high, (n_valid - win).double())  # the bottom layer cannot keep more than the prompt
        low = 2 * rest - high
        step = (high - low) / (num_layers - 1)

        def cumulative(n: int) -> torch.Tensor:  # rounded sum of the first n layers' budgets
            return torch.floor(n * (win + high) - step * n * (n - 1) / 2 + 0.5).long()

        # differences of rounded cumulative sums: every layer within 1 of its share, total exact
        pyramid = cumulative(layer + 1) - cumulative(layer)
        # as the official code (KVCache-Factory): a prompt shorter than 2 (B - w) has no room for a pyramid
        return torch.where(n_valid < 2 * (budget - win), budget, pyramid)

    def __call__(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        return self.heads(scores, budget)
