"""Eviction during decoding, driven by accumulated attention (H2O's decode-time policy).

After the prompt is compressed, every new query's attention over the held
tokens is added to their scores (mean over the G query heads of the KV group,
sum over the new queries, as the prefill's H2O scores). A segment may then grow
``SLACK`` tokens past its target; when one does, every segment over its target
is cut back to it: the last ``window`` tokens stay, the rest of the target goes
to the highest accumulated scores. The rows of a segment are in position order,
so one padded ``[B, H, M]`` score tensor lines up with the storage.

Memory stays bounded by (target + SLACK) rows per head for any generation length;
a cut-back re-lays out the layer once per SLACK decoded tokens (O(target) copy).
The extra cost per decoded token is one more pass over the held keys (plain torch).
"""

from __future__ import annotations

import torch

from .compression import pack_kept
from .kernels import reference
from .storage import RaggedKV

SLACK = 16  # tokens a segment may grow past its target between two cut-backs


class DecodeAccumulator:
    """Accumulated attention scores of one layer's held tokens, and the cut-back rule.

    ``scores``: float32 ``[B, H, M]``, entry m belonging to row ``start + m`` of
    segment (b, h); ``target``: int64 ``[B, H]`` (host), the tokens each segment
    is cut back to; ``window``: recent tokens that are never evicted.
    """

    def __init__(self, scores: torch.Tensor, target: torch.Tensor, window: int):
        self.scores = scores.float()
        self.target = target.to("cpu", torch.int64)
        self.window = window

    def observe(
        self,
        q: torch.Tensor,
        store: RaggedKV,
        scaling: float,
        softcap: float | None,
        hidden: torch.Tensor | None,
    ) -> None:
        """Add the attention of queries ``q`` ``[B, H, G, Q, D]`` (already appended to ``store``)."""
        probs = reference.ragged_attention_probs(
            q, store.keys, store.start, store.length, scaling, softcap, hidden, store.max_length()
        )
        mass = probs.sum(3).mean(2)  # [B, H, M]
        bsz, heads = mass.shape[:2]
        width = mass.shape[-1]
        if self.scores.shape[-1] < width:  # rows appended since the last step start at 0
            grown = self.scores.new_zeros(bsz, heads, width)
            grown[..., : self.scores.shape[-1]] = self.scores
            self.scores = grown
        self.scores = self.scores[..., :width] + mass

    def cut_back(self, store: RaggedKV) -> bool:
        """Evict down to the targets if some segment grew SLACK past its own; True if it did."""
        length = store.lengths()
        if not bool((length > self.target + SLACK).any()):
            return False
        width = self.scores.shape[-1]
        device = self.scores.device
        offs = torch.arange(width, device=device)
        length_d = length.to(device)
        inside = offs < length_d[..., None]
        protect = self.target.clamp(max=self.window).to(device)
        recent = offs >= (length_d - protect)[..., None]
        ranked = self.scores.masked_fill(recent, float("inf")).masked_fill(~inside, float("-inf"))
        order = ranked.argsort(dim=-1, descending=True)  # the protected (+inf) all fit: protect <= target
        rank = torch.empty_like(order).scatter_(-1, order, offs.expand_as(order).contiguous())
        keep = (rank < self.target.to(device)[..., None]) & inside
        store.retain(keep)
        self.scores = pack_kept(self.scores, keep, fill=0.0)
        return True

    def select_batch(self, index: torch.Tensor) -> None:
        self.scores = self.scores[index.to(self.scores.device)]
        self.target = self.target[index.to("cpu")]
