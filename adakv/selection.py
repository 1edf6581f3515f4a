"""The selection policy of a cache: budget -> scorer -> allocator -> kept tokens."""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .allocators import Allocator, CrossLayerAllocator
from .allocators.base import topk_mask
from .host import to_device
from .scorers import CriticalKV, ScoreInputs, Scorer, StagedScores

if TYPE_CHECKING:
    from .cascade import Cascade


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


def budget_argument(text: str) -> float | int:
    """A budget given on a command line (an ``argparse`` type): ``"0.2"`` a fraction, ``"128"`` tokens per KV head,
    ``"1"`` the whole prompt; bad input gets :func:`check_budget`'s message, not argparse's generic one."""
    try:
        value = float(text)
        return check_budget(int(value) if value.is_integer() and value > 1 else value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_window(window: object) -> int:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"window (the observation window, in tokens) must be an int >= 1, got {window!r}.")
    return int(window)


@dataclass
class Choice:
    """What a selection decided for one layer's candidates ``[B, H, L]``.

    ``keep``: bool keep mask; ``raw``: the scorer's scores (its second stage for staged scorers), fp32, or
    None when everything was kept without scoring; ``ranked``: the scores the allocator ranked (+inf where
    kept by rule, -inf at padding), or None likewise; ``scores``: the scorer's whole output (both stages of
    :class:`~adakv.scorers.StagedScores`), or None likewise; ``whole``: bool ``[B]`` on the host, the sequences
    that kept every candidate although others were scored (None: no sequence was scored).
    """

    keep: torch.Tensor
    raw: torch.Tensor | None = None
    ranked: torch.Tensor | None = None
    scores: torch.Tensor | StagedScores | None = None
    whole: torch.Tensor | None = None


@dataclass
class Ranking:
    """One layer's candidates ready for an allocator: ``ranked`` ``[B, H, L]`` (+inf kept by rule, -inf padding),
    the scorer's ``raw`` scores, the per-head ``budget`` ``[B]`` and the sequences that keep everything (``whole``
    ``[B]``); ``budget``, ``whole`` and ``head_budgets`` are host tensors (the allocators size their selections
    from them without waiting for the device)."""

    ranked: torch.Tensor
    raw: torch.Tensor
    budget: torch.Tensor
    whole: torch.Tensor
    scores: torch.Tensor | StagedScores
    head_budgets: torch.Tensor | None = None  # [B, H]: fixed per-head totals (a staged scorer's second stage)


class Selection:
    """Decides which tokens each (sequence, KV head) of a layer keeps: budget -> scorer -> allocator.

    The per-head budget of sequence b is ``round(budget * n_b)`` for a float budget and
    ``min(budget, n_b)`` for an int, n_b being the real (unpadded) tokens the sequence has *seen*
    (evicted ones included), so a prompt given in chunks ends with the same budget as in one piece.
    The last ``min(window, per-head budget)`` candidates are always kept and count inside the budget, after the
    tokens a scorer pins with ``+inf`` (sinks: StreamingLLM, KVzip): a head's window is then at most its budget
    minus its pinned tokens; a float budget keeps at least the scorer's ``pinned_positions`` per head (see
    :meth:`per_head`). Padding is never kept. A sequence whose candidates fit in its budget keeps them all.

    Cross-layer allocators (:class:`~adakv.allocators.CrossLayerAllocator`) split one budget over the
    layers through the cache's :class:`~adakv.cascade.Cascade`; with a staged scorer the first stage is
    chosen inside the layer (a per-layer floor), the second competes across layers.
    """

    def __init__(self, budget: float | int, scorer: Scorer, allocator: Allocator, window: int):
        self.budget = check_budget(budget)
        self.scorer = scorer
        self.allocator = allocator
        self.window = check_window(window)
        if isinstance(scorer, CriticalKV) and scorer.second_stage == "per-head" and self.cross_layer:
            raise ValueError(
                f"CriticalKV(second_stage='per-head') fixes each head's total inside its layer, which a cross-layer "
                f"allocator ({allocator!r}) cannot do: its second stage competes across layers. Use the default "
                "second_stage='joint' with it, or a per-layer allocator (e.g. adakv.AdaKV())."
            )

    @property
    def cross_layer(self) -> bool:
        return isinstance(self.allocator, CrossLayerAllocator)

    def tokens_per_head(self, n_seen: torch.Tensor) -> torch.Tensor:
        if isinstance(self.budget, int):
            return n_seen.clamp(max=self.budget)
        return torch.floor(n_seen.double() * self.budget + 0.5).long().clamp(min=1).minimum(n_seen)

    def per_head(
        self, n_seen: torch.Tensor, layer: int, num_layers: int, n_final: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-head budget ``[B]`` (host int64) of one layer, for sequences that have seen ``n_seen`` tokens.
        ``n_final``: the real tokens each prompt will have in all, when known (a chunked prefill): the budget is
        then the final one, capped at what was seen, so early chunks are not cut below what the end keeps.
        A fractional budget is never below the scorer's pinned tokens (its sinks): without that floor the first
        cut of a chunked prefill (a small budget of few tokens seen) would evict a sink that the whole prompt's
        budget keeps, and an evicted token never comes back. An int budget is the same at every cut: as given."""
        n_seen = n_seen.to("cpu", torch.int64)
        n_budget = n_seen if n_final is None else torch.maximum(n_final.to("cpu", torch.int64), n_seen)
        per_head = self.tokens_per_head(n_budget)
        per_head = self.allocator.layer_budget(per_head, n_budget, layer, num_layers, self.window)
        floor = 1 if isinstance(self.budget, int) else max(1, self.scorer.pinned_positions)
        return per_head.clamp(min=floor).minimum(n_seen.clamp(min=1))

    def rank(
        self,
        inputs: ScoreInputs,
        n_seen: torch.Tensor,
        scores: torch.Tensor | None = None,
        lookahead: int = 0,
        n_final: torch.Tensor | None = None,
        n_candidates: torch.Tensor | None = None,
    ) -> Ranking | None:
        """The scores the allocator ranks (+inf where kept by rule, -inf at padding) and the budgets; None when
        every sequence keeps all its candidates. ``scores``: use these instead of calling the scorer;
        ``lookahead``, ``n_final``, ``n_candidates``: see :meth:`select`."""
        valid = candidates(inputs, lookahead)
        heads, seq = inputs.keys.shape[1], inputs.keys.shape[2]
        per_head = self.per_head(n_seen, inputs.layer, inputs.num_layers, n_final)
        if self.cross_layer:
            # after a first chunk the layers hold different counts, so one layer's candidates fitting its share
            # says nothing: the layers still compete. Only a prompt within budget (nothing ever cut) is whole.
            whole = per_head >= n_seen.to("cpu", torch.int64)
        else:
            if n_candidates is None:
                n_candidates = valid.sum((1, 2)).cpu()  # waits for the device: callers that know it pass it
            whole = per_head * heads >= n_candidates.to("cpu", torch.int64)  # [B]
        if bool(whole.all()):
            return None
        out = self.scorer(inputs) if scores is None else scores
        raw = raw_scores(out)
        # the window is kept by rule; under a lookahead the window is the probe, which is not a candidate
        protect = per_head.clamp(max=0 if lookahead else self.window)  # host [B]
        # tokens the scorer pins with +inf (sinks) come first: the window keeps what they leave of each head's budget
        pinned = ((raw == float("inf")) & valid).sum(-1)  # [B, H]
        room = (to_device(per_head, valid.device)[:, None] - pinned).clamp(min=0)
        window = torch.minimum(to_device(protect, valid.device)[:, None], room)
        from_end = torch.arange(seq - 1, -1, -1, device=valid.device)
        protected = from_end < window[..., None]  # right-aligned: the window is the tail
        budget = per_head
        head_budgets = None
        if isinstance(out, StagedScores):
            first = self._prepare(out.first, protected, valid)
            if self.cross_layer or not out.per_head:
                # the first stage keeps the window and its fraction of the rest of the budget; the heads (and with
                # a cross-layer allocator the layers) then compete for the rest on the second-stage scores
                stage1 = protect + torch.floor((budget - protect).double() * out.first_fraction).long()
                protected = protected | self.allocator(first, stage1)
            else:
                # as CriticalKV's code (CriticalAdaKVPress): the allocator sets each head's total once, from the
                # first-stage (base) scores; each head keeps floor(first_fraction x its total) by them (the window,
                # at +inf, inside), then fills its own total by the second-stage scores; heads do not compete again
                head_budgets = self.allocator(first, budget).sum(-1).cpu()  # each head's total, read once
                stage1 = torch.floor(head_budgets.double() * out.first_fraction).long()
                protected = protected | head_topk(first, stage1)
        ranked = self._prepare(raw, protected, valid)
        return Ranking(ranked, raw, budget, whole, out, head_budgets)

    def select(
        self,
        inputs: ScoreInputs,
        n_seen: torch.Tensor,
        cascade: Cascade | None = None,
        scores: torch.Tensor | None = None,
        lookahead: int = 0,
        n_final: torch.Tensor | None = None,
        n_candidates: torch.Tensor | None = None,
    ) -> Choice:
        """Keep mask ``[B, H_kv, L]`` over ``inputs``' candidates, for sequences that have seen ``n_seen``.

        ``cascade``: the cross-layer cascade this layer competes in; ``scores``: use these instead of calling
        the scorer (a context scorer's finalized scores); ``lookahead``: the last this many columns are a probe
        (the prompt's final window, run ahead of its turn by :func:`adakv.prefill_in_chunks`): the scorer sees
        them as its window, but they are not candidates (never kept, not counted in ``n_seen``) and no other
        token is kept by rule; ``n_final``: the real tokens each prompt will have once all its chunks are in
        (known to :func:`adakv.prefill_in_chunks`): a chunk keeps up to the final budget, not the budget of
        the tokens seen so far (see :meth:`per_head`); ``n_candidates``: host int64 ``[B]``, the candidates of each
        sequence over its heads when the caller knows them (else they are counted, a wait for the device)."""
        valid = candidates(inputs, lookahead)
        ranking = self.rank(inputs, n_seen, scores, lookahead, n_final, n_candidates)
        if ranking is None:
            return Choice(valid.clone())
        if cascade is not None:
            keep = cascade.compete(inputs.layer, ranking.ranked, ranking.budget, ranking.whole)
        elif ranking.head_budgets is not None:
            keep = head_topk(ranking.ranked, ranking.head_budgets)
        else:
            keep = self.allocator(ranking.ranked, ranking.budget)
        keep = torch.where(to_device(ranking.whole, valid.device)[:, None, None], valid, keep & valid)
        return Choice(keep, ranking.raw, ranking.ranked, ranking.scores, ranking.whole)

    def _prepare(self, scores: torch.Tensor, protected: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Check a scorer's output; +inf where tokens must be kept, -inf at padding."""
        expected = tuple(valid.shape)
        if tuple(scores.shape) != expected:
            raise ValueError(
                f"{self.scorer!r} returned scores of shape {tuple(scores.shape)}; expected {expected} "
                "([batch, kv_heads, seq])."
            )
        scores = scores.float().nan_to_num(nan=0.0, posinf=torch.finfo(torch.float32).max)
        return scores.masked_fill(protected, float("inf")).masked_fill(~valid, float("-inf"))

    def __repr__(self) -> str:
        return (
            f"Selection(budget={self.budget}, scorer={self.scorer!r}, allocator={self.allocator!r}, "
            f"window={self.window})"
        )


def head_topk(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep mask of the ``k[b, h]`` best of each (sequence, head)'s ``scores`` ``[B, H, L]``."""
    bsz, heads, seq = scores.shape
    return topk_mask(scores.reshape(bsz * heads, seq), k.reshape(-1)).reshape(bsz, heads, seq)


def candidates(inputs: ScoreInputs, lookahead: int) -> torch.Tensor:
    """``inputs.valid`` without the last ``lookahead`` columns (a probe that is scored with, not kept)."""
    if not lookahead:
        return inputs.valid
    valid = inputs.valid.clone()
    valid[..., valid.shape[-1] - lookahead :] = False
    return valid


def map_scores(fn: Callable[..., torch.Tensor], *scores: torch.Tensor | StagedScores):
    """``fn`` applied to scorer outputs of one structure: to the tensors, or stage by stage to
    :class:`StagedScores` (the first one's ``first_fraction`` is kept)."""
    if isinstance(scores[0], StagedScores):
        first = fn(*(s.first for s in scores))
        return dataclasses.replace(scores[0], first=first, second=fn(*(s.second for s in scores)))
    return fn(*scores)


def raw_scores(scores: torch.Tensor | StagedScores) -> torch.Tensor:
    """What a :class:`Choice` calls ``raw``: the scores, or a staged scorer's second stage, in fp32."""
    return (scores.second if isinstance(scores, StagedScores) else scores).float()


def pack_kept(
    values: torch.Tensor, keep: torch.Tensor, fill: float = float("-inf"), width: int | None = None
) -> torch.Tensor:
    """The kept entries of ``values`` ``[B, H, M]``, left-aligned in position order, ``fill`` after. ``width``: the
    most any row keeps, when the host knows it (else it is counted, a wait for the device)."""
    if width is None:
        counts = keep.sum(-1)
        width = int(counts.max()) if counts.numel() else 0
    out = torch.full((*values.shape[:-1], width + 1), fill, dtype=values.dtype, device=values.device)
    slot = torch.where(keep, torch.cumsum(keep.long(), -1) - 1, width)
    return out.scatter_(-1, slot, values.masked_fill(~keep, fill))[..., :width]
