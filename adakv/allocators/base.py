"""What an allocator sees and returns."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..host import to_device


class Allocator(ABC):
    """Turns one layer's scores into the kept tokens of every (sequence, KV head).

    ``scores``: float32 ``[B, H_kv, L]``, ``-inf`` at padding and ``+inf`` at tokens
    that must be kept (the observation window). ``budget``: int64 ``[B]`` on the
    host (so that a selection is sized without waiting for the device: pass it to
    :func:`topk_mask`, or move it with :func:`adakv.host.to_device`), the
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


def topk_mask(scores: torch.Tensor, k: torch.Tensor, bound: int | None = None) -> torch.Tensor:
    """Bool mask of the ``k[r]`` highest entries of each row of ``scores`` ``[R, N]``. ``bound``: an upper bound
    of ``k`` known on the host; without it ``k``'s maximum is read, which waits for the device when ``k`` is there
    (``k`` on the host costs no wait)."""
    if bound is None:
        bound = int(k.max()) if k.numel() else 0
    k_max = min(bound, scores.shape[-1])
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k_max <= 0:
        return mask
    # a stable sort, not topk: equal scores (SnapKV's max pooling makes many) go to the earlier token whatever the
    # rest of the batch, where topk's choice among ties changes with the tensor's shape
    idx = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k_max]
    take = torch.arange(k_max, device=scores.device)[None, :] < to_device(k, scores.device)[:, None]
    return mask.scatter_(-1, idx, take)


def check_alpha(owner: str, alpha: object) -> float:
    """A safeguard fraction in [0, 1], or a ValueError naming ``owner``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{owner} alpha must be a number in [0, 1], got {alpha!r}.")
    return float(alpha)


def safeguarded(pieces: list[torch.Tensor], floor_k: torch.Tensor | None, total: torch.Tensor) -> list[torch.Tensor]:
    """Keep masks of the ``[B, H, M_i]`` score pieces (``-inf``: not a candidate): every (piece, head) first keeps
    its own ``floor_k[b]`` best candidates (fewer if it has fewer), then the rest of ``total[b]`` goes to the best
    remaining scores of all pieces and heads jointly (Ada-KV's safeguard, over one layer or several). ``floor_k``
    None: no floors, one top-k over everything (no per-piece work: the cascade calls this at every layer)."""
    bsz = pieces[0].shape[0]
    device = pieces[0].device
    total = total.to("cpu", torch.int64)  # host budgets: the selections below read their bounds without a wait
    bound = int(total.max()) if total.numel() else 0
    floors = []
    if floor_k is not None:
        floor_k = floor_k.to("cpu", torch.int64)
        for p in pieces:
            rows = p.reshape(p.shape[0] * p.shape[1], p.shape[-1])  # not (-1, M): a piece may be empty
            k = floor_k.repeat_interleave(p.shape[1]).clamp(max=rows.shape[-1])
            floors.append(topk_mask(rows, k).reshape(p.shape) & (p > float("-inf")))
        # what the floors took is on the device: the rest's count stays there, bounded by the host total
        total = (to_device(total, device) - sum(f.reshape(bsz, -1).sum(-1) for f in floors)).clamp(min=0)
        pieces = [p.masked_fill(f, float("-inf")) for p, f in zip(pieces, floors)]
    rest = topk_mask(torch.cat([p.reshape(bsz, -1) for p in pieces], -1), total, bound)
    out, offset = [], 0
    for i, p in enumerate(pieces):
        n = p[0].numel()
        mask = rest[:, offset : offset + n].reshape(p.shape)
        out.append(floors[i] | mask if floors else mask)
        offset += n
    return out
