"""The eviction policy of a cache: budget -> scorer -> allocator -> kept tokens."""

from __future__ import annotations

import math
import numbers
import weakref

import torch

from .allocators import Allocator, LayerAdaptive
from .scorers import ScoreInputs, Scorer, StagedScores


def check_budget(budget: object) -> float | int:
    """Validate a budget: a float in (0, 1] (fraction of the prompt) or an int >= 1 (tokens per KV head)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(
            f"budget must be a number: a float in (0, 1] (fraction of the prompt kept) or an int >= 1 "
            f"(tokens kept per KV head), got {budget!r} ({type(budget).__name__})."
        )
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(
                f"An integer budget is the number of tokens kept per KV head and must be >= 1, got {budget}."
            )
        return int(budget)
    budget = float(budget)
    if not math.isfinite(budget) or not 0.0 < budget <= 1.0:
        raise ValueError(
            f"A float budget is the fraction of the prompt kept and must be in (0, 1], got {budget}. "
            "For a number of tokens per KV head pass an int."
        )
    return budget


def check_window(window: object) -> int:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"window (the observation window, in tokens) must be an int >= 1, got {window!r}.")
    return int(window)


class Compressor:
    """Decides, once per prompt and layer, which tokens each (sequence, KV head) keeps.

    The per-head budget of sequence b is ``round(budget * n_b)`` for a float budget
    and ``min(budget, n_b)`` for an int, n_b being its real (unpadded) length. The
    last ``min(window, per-head budget)`` tokens are always kept and count inside
    the budget; padding is never kept. A prompt within budget is kept whole.
    """

    def __init__(self, budget: float | int, scorer: Scorer, allocator: Allocator, window: int):
        self.budget = check_budget(budget)
        self.scorer = scorer
        self.allocator = allocator
        self.window = check_window(window)
        self._layers: list[weakref.ref] = []  # the cache's compressed layers (weak: no reference cycle)

    def set_layers(self, layers: list) -> None:
        """The cache's compressed layers, in order (cross-layer allocators need them)."""
        self._layers = [weakref.ref(layer) for layer in layers]

    @property
    def layers(self) -> list:
        return [ref() for ref in self._layers]

    def tokens_per_head(self, n_valid: torch.Tensor) -> torch.Tensor:
        if isinstance(self.budget, int):
            return n_valid.clamp(max=self.budget)
        return torch.floor(n_valid.double() * self.budget + 0.5).long().clamp(min=1).minimum(n_valid)

    def select(
        self, inputs: ScoreInputs, with_scores: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Bool keep mask ``[B, H_kv, L]`` for one layer's prefill; ``with_scores``: also the
        scorer's raw scores (its second stage for staged scorers), computed even if all is kept."""
        valid = inputs.valid
        bsz, heads, seq, _ = inputs.keys.shape
        n_valid = valid.sum(-1).cpu()
        per_head = self.tokens_per_head(n_valid)
        per_head = self.allocator.layer_budget(per_head, n_valid, inputs.layer, inputs.num_layers, self.window)
        per_head = per_head.clamp(min=1).minimum(n_valid)
        whole = valid[:, None, :].expand(bsz, heads, seq)
        if bool((per_head >= n_valid).all()) and not with_scores:
            return whole.clone()
        out = self.scorer(inputs)
        if with_scores:
            raw = (out.second if isinstance(out, StagedScores) else out).float()
            return self._select_from(out, inputs, per_head, n_valid), raw
        return self._select_from(out, inputs, per_head, n_valid)

    def _select_from(
        self, out: torch.Tensor | StagedScores, inputs: ScoreInputs, per_head: torch.Tensor, n_valid: torch.Tensor
    ) -> torch.Tensor:
        valid = inputs.valid
        bsz, heads, seq, _ = inputs.keys.shape
        whole = valid[:, None, :].expand(bsz, heads, seq)
        if bool((per_head >= n_valid).all()):
            return whole.clone()
        protect = torch.minimum(per_head, torch.tensor(self.window)).to(valid.device)
        pos_from_end = torch.arange(seq - 1, -1, -1, device=valid.device)
        protected = (pos_from_end[None, :] < protect[:, None])[:, None, :]  # left padding: the window is the tail
        budget = per_head.to(valid.device)
        if isinstance(out, StagedScores):
            first = self._prepare(out.first, heads, protected, valid)
            # the first stage chooses its fraction of the budget left after the window, as in the paper's code
            stage1 = protect + torch.floor((budget - protect).double() * out.first_fraction).long()
            kept_first = self.allocator(first, stage1)
            second = self._prepare(out.second, heads, protected | kept_first, valid)
            keep = self.allocator(second, budget)
        elif getattr(self.allocator, "cross_layer", False):
            keep = self._across_layers(self._prepare(out, heads, protected, valid), budget, inputs.layer)
        else:
            keep = self.allocator(self._prepare(out, heads, protected, valid), budget)
        within = (per_head >= n_valid).to(valid.device)
        return torch.where(within[:, None, None], whole, keep & valid[:, None, :])

    def _across_layers(self, scores: torch.Tensor, budget: torch.Tensor, rank: int) -> torch.Tensor:
        """Cascading cross-layer selection: this layer and the tokens earlier layers hold compete."""
        layers = self.layers
        earlier = layers[:rank]
        if any(getattr(layer, "kept_scores", None) is None for layer in earlier):
            raise ValueError("Cross-layer allocation needs the layers prefilled in order, in one forward.")
        pieces = [layer.kept_scores for layer in earlier] + [scores]
        masks = LayerAdaptive.across_layers(pieces, budget * scores.shape[1] * (rank + 1))
        for layer, mask in zip(earlier, masks):
            layer.store.retain(mask)
            layer.kept_scores = pack_kept(layer.kept_scores, mask)
        keep = masks[-1]
        if layers:
            layers[rank].kept_scores = pack_kept(scores, keep)
        return keep

    def _prepare(self, scores: torch.Tensor, heads: int, protected: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Check a scorer's output; +inf where tokens must be kept, -inf at padding."""
        expected = (valid.shape[0], heads, valid.shape[1])
        if tuple(scores.shape) != expected:
            raise ValueError(
                f"{self.scorer!r} returned scores of shape {tuple(scores.shape)}; expected {expected} "
                "([batch, kv_heads, seq])."
            )
        scores = scores.float().nan_to_num(nan=0.0, posinf=torch.finfo(torch.float32).max)
        return scores.masked_fill(protected, float("inf")).masked_fill(~valid[:, None, :], float("-inf"))

    def __repr__(self) -> str:
        return (
            f"Compressor(budget={self.budget}, scorer={self.scorer!r}, allocator={self.allocator!r}, "
            f"window={self.window})"
        )


def pack_kept(values: torch.Tensor, keep: torch.Tensor, fill: float = float("-inf")) -> torch.Tensor:
    """The kept entries of ``values`` ``[B, H, M]``, left-aligned in position order, ``fill`` after."""
    counts = keep.sum(-1)
    width = int(counts.max()) if counts.numel() else 0
    out = torch.full((*values.shape[:-1], width + 1), fill, dtype=values.dtype, device=values.device)
    slot = torch.where(keep, torch.cumsum(keep.long(), -1) - 1, width)
    return out.scatter_(-1, slot, values.masked_fill(~keep, fill))[..., :width]
