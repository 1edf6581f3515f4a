"""What an allocator sees and returns."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Allocator(ABC):
    """Turns one layer's scores into the kept tokens of every (sequence, KV head).

    ``scores``: float32 ``[B, H_kv, L]``, ``-inf`` at padding and ``+inf`` at tokens
    that must be kept (the observation window). ``budget``: int64 ``[B]``, the
    average number of tokens to keep per KV head of each sequence; the cache
    guarantees ``budget[b]`` is at most the sequence's real length and at least
    the number of protected tokens per head. Returns a bool keep mask
    ``[B, H_kv, L]`` holding exactly ``H_kv * budget[b]`` tokens of sequence b.
    """

    name: str = "allocator"

    @abstractmethod
    def __call__(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor: ...

    def layer_budget(
        self, budget: torch.Tensor, n_valid: torch.Tensor, layer: int, num_layers: int, window: int
    ) -> torch.Tensor:
        """Per-head budget of one layer, from the cache's average per-head ``budget`` ``[B]``.

        ``n_valid`` ``[B]`` are the sequences' real lengths, ``layer`` the index among the
        ``num_layers`` compressed layers, ``window`` the observation window.

        The default gives every layer the same; layer-wise allocators (PyramidKV)
        override it, keeping the average over layers equal to ``budget``.
        """
        return budget

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class CrossLayerAllocator(Allocator):
    """An allocator whose budget is shared by the layers: one total over layers x heads x tokens.

    ``__call__`` allocates within one layer (used for its first-stage selection and when the layer is
    alone); :meth:`across_layers` splits the total between the pieces of several layers. The cache runs
    the cascade (:mod:`adakv.cascade`): at each compressed layer, that layer's fresh scores and the
    scores of what earlier layers still hold compete for ``(l + 1) * H * B`` tokens per sequence.
    """

    @abstractmethod
    def across_layers(self, pieces: list[torch.Tensor], total: torch.Tensor) -> list[torch.Tensor]:
        """Keep masks, one per ``[B, H, M_i]`` score piece, holding ``total[b]`` tokens of sequence b in all."""


def topk_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool mask of the ``k[r]`` highest entries of each row of ``scores`` ``[R, N]``."""
    k_max = int(k.max()) if k.numel() else 0
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k_max == 0:
        return mask
    idx = scores.topk(k_max, dim=-1, sorted=True).indices
    take = torch.arange(k_max, device=scores.device)[None, :] < k.to(scores.device)[:, None]
    return mask.scatter_(-1, idx, take)
