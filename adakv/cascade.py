"""Cross-layer allocation, cascading layer by layer through one forward (Layer-DefensiveKV's global budget)."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from . import host
from .allocators import CrossLayerAllocator

if TYPE_CHECKING:
    from .layer import AdaKVLayer

# An earlier layer is re-laid out during the forward only once the rows it still stores exceed this many times
# what the cascade lets it hold: memory stays within that factor of the strict cascade, and a layer is re-laid out
# only when what it keeps has more than halved since its last re-layout, so at most 1 + log2(the tokens it first
# keeps) times per forward (usually once, at the last layer), not once per later layer.
SHRINK_FACTOR = 2


class Cascade:
    """One budget over layers x heads x tokens, decided as the forward reaches each compressed layer.

    At the l-th compressed layer (0-based) the layer's fresh scores and the scores of the tokens layers
    0..l-1 still hold compete for ``(l + 1) * H * B`` tokens per sequence (``allocator.across_layers``).
    The losers of earlier layers are only *marked* (their score becomes -inf); an earlier layer is
    re-laid out when its stored rows exceed ``SHRINK_FACTOR`` times what it keeps, and every layer is
    settled at the last compressed layer, so a forward costs O(layers) re-layouts, not O(layers^2).
    Earlier layers must have been scored in the same forward (layers are prefilled in order).
    """

    def __init__(self, allocator: CrossLayerAllocator):
        self.allocator = allocator
        self._layers: list[weakref.ref] = []  # weak: no reference cycle between the cache's layers and this

    def set_layers(self, layers: list[AdaKVLayer]) -> None:
        self._layers = [weakref.ref(layer) for layer in layers]

    @property
    def layers(self) -> list[AdaKVLayer]:
        return [ref() for ref in self._layers]

    def compete(self, rank: int, ranked: torch.Tensor, per_head: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        """Keep mask of layer ``rank``'s candidates (``ranked``: +inf kept by rule, -inf padding); marks the
        tokens earlier layers lose. ``whole`` ``[B]``: sequences that keep everything."""
        layers = self.layers
        earlier = layers[:rank]
        if any(layer.cascade_scores is None for layer in earlier):
            raise ValueError(
                "Cross-layer allocation needs every compressed layer scored in order in the same forward; "
                f"layer {rank} came before its predecessors were."
            )
        pieces = [layer.cascade_scores for layer in earlier] + [ranked]
        total = per_head * ranked.shape[1] * (rank + 1)
        everything = sum(int(p[0].numel()) for p in pieces)
        # after a first chunk the layers may hold fewer candidates than the budget: then all of them compete
        total = torch.where(whole, torch.full_like(total, everything), total.clamp(max=everything))
        masks = self.allocator.across_layers(pieces, total)
        masks = [mask & (piece > float("-inf")) for mask, piece in zip(masks, pieces)]
        counts = [layer.cascade_mark(mask) for layer, mask in zip(earlier, masks)]
        if not earlier:
            return masks[-1]
        if rank == len(layers) - 1:  # the last layer: every earlier one settles
            due = [True] * len(earlier)
        else:  # a layer re-lays out once it stores SHRINK_FACTOR x what it keeps; one read for all of them
            (counts,) = host.to_host(torch.stack(counts))
            due = [int(layer.store.lengths().sum()) > SHRINK_FACTOR * int(n) for layer, n in zip(earlier, counts)]
        for layer, settle in zip(earlier, due):
            if settle:
                layer.cascade_settle()
        return masks[-1]
