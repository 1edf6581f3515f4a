"""One budget shared by all layers x heads x tokens, decided layer by layer (cascading)."""

from __future__ import annotations

import torch

from .base import CrossLayerAllocator, check_alpha, safeguarded


class LayerAdaptive(CrossLayerAllocator):
    """Layer-adaptive allocation (Layer-DefensiveKV): layers and heads compete for one budget.

    Feng et al., "Taming the Fragility of KV Cache Eviction in LLM Inference", 2025
    (arXiv:2510.13334).

    The published method takes one top-k over the scores of every layer x head x
    token, which needs every layer's full KV until the last layer is scored. Here
    it cascades: when layer l (the l-th compressed layer, 0-based) is prefilled,
    the (l + 1) * H * B highest scores among layer l's tokens and the tokens that
    layers 0..l-1 still hold win, and the earlier layers give up the rest. The
    last layer therefore ends with exactly the published total L * H * B.

    Peak bound: during prefill the cache never holds more than 2 * (l + 1) * H * B
    tokens per sequence after layer l (the tokens earlier layers lose stay stored until
    a layer holds twice what it keeps: :mod:`adakv.cascade`), plus per-segment slack, plus one
    layer's dense K/V (the layer being prefilled, which the model holds anyway).

    Cascading differs from the one-shot top-k only when later layers score lower
    than earlier ones: a token evicted early cannot come back. Window tokens are
    kept in every layer (they score +inf); a deviation: the official code gives them their layer's maximum
    score, so a layer that scores low everywhere can lose window tokens to the global top-k.

    Args:
        alpha: safeguard fraction in [0, 1] (adakv's addition; 0, the published method, by default): every
            (layer, head) first keeps its own best ``floor(alpha * B)`` tokens, B the average per head, window
            included, as Ada-KV's safeguard does for the heads of one layer; the rest of the total is shared as
            above. A global top-k can leave a layer almost nothing (KVzip+ on SmolLM2 keeps 3-5% in most of the
            lower layers at 0.2), which a floor bounds.
    """

    name = "layer-adaptive"

    def __init__(self, alpha: float = 0.0):
        self.alpha = check_alpha("LayerAdaptive", alpha)

    def __call__(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        """One layer alone: heads compete jointly, after the safeguard (Ada-KV's allocation)."""
        return self.across_layers([scores], budget * scores.shape[1])[0]

    def across_layers(self, pieces: list[torch.Tensor], total: torch.Tensor) -> list[torch.Tensor]:
        """``total[b]`` tokens over the ``[B, H, M_i]`` score pieces (one per layer; ``total`` is their average
        per-head budget times layers x heads), after each (piece, head)'s safeguard; one keep mask per piece."""
        if not self.alpha:
            return safeguarded(pieces, None, total)
        fair = total.double() / (len(pieces) * pieces[0].shape[1])
        return safeguarded(pieces, torch.floor(fair * self.alpha).long(), total)
