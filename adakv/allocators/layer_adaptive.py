"""One budget shared by all layers x heads x tokens, decided layer by layer (cascading)."""

from __future__ import annotations

import torch

from .base import CrossLayerAllocator, topk_mask


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

    Peak bound: during prefill the cache never holds more than (l + 1) * H * B
    kept tokens per sequence after layer l, plus per-segment slack, plus one
    layer's dense K/V (the layer being prefilled, which the model holds anyway).

    Cascading differs from the one-shot top-k only when later layers score lower
    than earlier ones: a token evicted early cannot come back. Window tokens are
    kept in every layer (they score +inf).
    """

    name = "layer-adaptive"

    def __call__(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        """One layer alone: heads compete jointly (Ada-KV without safeguard)."""
        bsz, heads, seq = scores.shape
        return topk_mask(scores.reshape(bsz, heads * seq), budget * heads).reshape(bsz, heads, seq)

    def across_layers(self, pieces: list[torch.Tensor], total: torch.Tensor) -> list[torch.Tensor]:
        """Top ``total[b]`` over the concatenation of ``[B, H, M_i]`` score pieces; one keep mask per piece."""
        bsz = pieces[0].shape[0]
        flat = torch.cat([p.reshape(bsz, -1) for p in pieces], -1)
        mask = topk_mask(flat, total)
        out, offset = [], 0
        for p in pieces:
            n = p[0].numel()
            out.append(mask[:, offset : offset + n].reshape(p.shape))
            offset += n
        return out
