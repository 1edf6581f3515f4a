"""H2O's decoding policy: accumulated attention, with bounded per-head eviction."""

from __future__ import annotations

import torch

from ..kernels import reference
from ..scorers import H2O
from ..scorers.h2o import accumulated_attention
from ..selection import pack_kept
from ..storage import fit_width
from .base import DecodePolicy, DecodeState, check_interval


class H2ODecode(DecodePolicy):
    """H2O while decoding (Zhang et al., NeurIPS 2023, arXiv:2306.14048).

    Every new query's attention over the held tokens is added to their scores (mean over the G query
    heads of the KV group, sum over the new queries: the prefill's H2O score). A segment may grow
    ``slack`` tokens past its target (what it kept after the prompt, so Ada-KV's per-head allocation is
    preserved; for an int budget, at least the budget, so short prompts may grow to it); then every
    segment over its target is cut back: the last ``window`` tokens stay, the rest by accumulated score.

    Memory stays within (target + slack) rows per head for any generation length. Cost per decoded
    token: one more pass over the held keys (plain torch); a re-layout of the layer per ``slack`` tokens.
    The scores start from H2O's prefill scores: the scorer's own when it is H2O, else computed once on
    the prompt (so they are on H2O's scale whatever the scorer). With chunked prefill they restart at
    each chunk from that chunk's queries.
    """

    name = "h2o"
    follows_cross_layer_cuts = True  # H2OState.rows_kept

    def __init__(self, slack: int = 16):
        self.slack = check_interval(slack, "H2ODecode slack")

    def start(self, layer, inputs, choice, previous) -> DecodeState:
        scorer = layer.policy.selection.scorer
        if isinstance(scorer, H2O) and choice.raw is not None:
            scores = choice.raw
        else:
            scores = accumulated_attention(inputs)
        target = layer.store.lengths()  # the store was just laid out from choice.keep: no wait for the device
        budget = layer.policy.selection.budget
        if isinstance(budget, int):  # a prompt within the budget (nothing cut) may grow up to it
            short = (layer.n_real <= budget)[:, None]
            target = torch.where(short, target.clamp(min=budget), target)  # a cut head keeps its own allocation
        packed = pack_kept(scores.float(), choice.keep, fill=0.0, width=layer.store.max_length())
        return H2OState(packed, target, inputs.window, self.slack)


class H2OState(DecodeState):
    """``scores``: fp32 ``[B, H, M]``, entry m for row m of segment (b, h); ``target``: host int64 ``[B, H]``."""

    def __init__(self, scores: torch.Tensor, target: torch.Tensor, window: int, slack: int):
        self.scores = scores
        self.target = target
        self.window = window
        self.slack = slack

    def after_append(self, layer, module, q, scaling, softcap, hidden, valid) -> None:
        store = layer.store
        probs = reference.ragged_attention_probs(
            q, store.keys, store.start, store.length, scaling, softcap, hidden, store.max_length()
        )
        if valid is not None:  # padded queries pay no attention (as in the prefill's H2O scores)
            probs = probs * valid.to(probs.device, probs.dtype)[:, None, None, :, None]
        mass = probs.sum(3).mean(2)  # [B, H, M]
        width = mass.shape[-1]
        if self.scores.shape[-1] < width:  # rows appended since the last step start at 0
            self.scores = torch.nn.functional.pad(self.scores, (0, width - self.scores.shape[-1]))
        self.scores = self.scores[..., :width] + mass
        self.cut_back(layer)

    def cut_back(self, layer) -> bool:
        """Evict down to the targets if some segment grew ``slack`` past its own; True if it did."""
        length = layer.store.lengths()
        if not bool((length > self.target + self.slack).any()):
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
        layer.evict_rows(keep)
        self.scores = pack_kept(self.scores, keep, fill=0.0)
        return True

    def rows_kept(self, layer, keep: torch.Tensor) -> None:
        # the scores follow their rows, and each head's target is at most what the cascade left it
        self.scores = pack_kept(fit_width(self.scores, keep.shape[-1], 0.0), keep, fill=0.0)
        self.target = torch.minimum(self.target, layer.store.lengths())

    def select_batch(self, index: torch.Tensor) -> None:
        self.scores = self.scores[index.to(self.scores.device)]
        self.target = self.target[index.to("cpu")]
