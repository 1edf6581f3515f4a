"""What a scorer sees and returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ScoreInputs:
    """The tokens one layer must choose among, as handed to a scorer.

    - ``keys``, ``values``: ``[B, H_kv, L, D]``, in position order along L. In a one-shot prefill these are
      the prompt's K/V; for a later prompt chunk or a decode-time rescoring they are the tokens the layer
      still holds (a right-aligned view: each head's tokens end in column L - 1, shorter heads padded in
      front) followed by the new ones.
    - ``queries``: ``[B, H_q, Q, D]`` (after RoPE), Q <= L: the queries of the *last* Q key columns, so
      query i sits at column ``L - Q + i`` and attends causally to columns <= that.
    - ``valid``: bool ``[B, H_kv, L]``, False at padding (left padding of the prompt, or the front padding
      of shorter heads). A bool ``[B, L]`` (one row for all heads) is accepted and expanded.
    - ``positions``: int64 ``[B, H_kv, L]``, each token's position in its sequence (0 = first real token),
      -1 at padding; derived from ``valid`` when not given (a contiguous prompt).
    - ``window``: the observation window (the last ``window`` columns are always kept); ``scaling`` and
      ``softcap``: the layer's logit scale and optional tanh soft-capping; ``module``: the attention
      module (``o_proj``, ``layer_idx``); ``layer`` / ``num_layers``: this layer's index among the
      cache's compressed layers, and their count.
    - ``n_positions``: a host int above every position (not necessarily the tightest), when the cache knows
      one; scorers that size a buffer by position use it instead of reading ``positions`` (a wait for the
      device). None: unknown.
    - ``lookahead``: the last this many columns are a probe (:func:`adakv.prefill_in_chunks`: the prompt's final
      window run ahead of its turn, at its own positions past this chunk): scored with, never kept, not seen yet.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    window: int
    scaling: float
    softcap: float | None
    module: nn.Module
    layer: int = 0
    num_layers: int = 1
    positions: torch.Tensor | None = None
    n_positions: int | None = None
    lookahead: int = 0

    def __post_init__(self) -> None:
        bsz, heads, seq = self.keys.shape[:3]
        if self.valid.dim() == 2:
            self.valid = self.valid[:, None, :].expand(bsz, heads, seq)
        if tuple(self.valid.shape) != (bsz, heads, seq):
            raise ValueError(
                f"valid must be [B, L] or [B, H_kv, L] = {(bsz, heads, seq)}, got {tuple(self.valid.shape)}"
            )
        if self.queries.shape[2] > seq:
            raise ValueError(f"{self.queries.shape[2]} queries for {seq} key columns: queries must be the last ones.")
        if self.positions is None:
            self.positions = (torch.cumsum(self.valid.long(), -1) - 1).masked_fill(~self.valid, -1)
            self.n_positions = seq

    @property
    def group_size(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    @property
    def query_offset(self) -> int:
        """Column of the first query's own token (``L - Q``)."""
        return self.keys.shape[2] - self.queries.shape[2]


@dataclass
class StagedScores:
    """Two-stage selection, returned by scorers such as CriticalKV.

    The allocator first keeps ``first_fraction`` of the budget by ``first``; the
    rest of the budget is then filled by ``second`` (both ``[B, H_kv, L]``).
    ``per_head``: with a per-layer allocator, each head's total is fixed by ``first`` and the second stage
    fills it head by head (False: the first stage keeps its share of the budget after the window, then the
    heads compete again for the rest on ``second``).
    """

    first: torch.Tensor
    second: torch.Tensor
    first_fraction: float
    per_head: bool = False


class Scorer(ABC):
    """Maps a layer's prefill to token scores ``[B, H_kv, L]`` (float32, higher = keep).

    Scores at padding positions are ignored, and the observation window is
    always kept by the cache, so a scorer need not special-case either.
    """

    name: str = "scorer"
    # How a held token is ranked at a later prompt chunk's cut when AdaKVCache(chunk_scores=None) (the default):
    # "latest" by this scorer's new score, "max" by the best it has had. Chosen by measurement (README, *Chunked
    # prefill*): "max" kept DefensiveKV's needles; with SnapKV's raw window attention, larger at an early cut when
    # fewer keys share it, "max" kept early tokens on stale scores and lost needles.
    chunk_scores: str = "latest"

    @property
    def pinned_positions(self) -> int:
        """How many first positions of each sequence this scorer always scores +inf (its attention sinks): a
        fractional budget keeps at least this many tokens per head (:meth:`Selection.per_head`), so a prompt fed
        in chunks, whose first cuts have small budgets, keeps the same sinks as one fed whole. Default 0."""
        return 0

    @abstractmethod
    def __call__(self, inputs: ScoreInputs) -> torch.Tensor | StagedScores: ...

    def check_model(self, model: nn.Module) -> None:
        """Refuse, with a ValueError, a model this scorer cannot score: called with the model when a cache is built
        for one, and with each compressed layer's attention module at its first forward when the cache was built
        from a config (so ``model`` may be a single attention module). Default: any model."""
        return None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


@dataclass
class ScoringPass:
    """One scoring forward of a :class:`ContextScorer`: token ids and mask ``[B, n]`` placed after the context,
    and the context positions it scores, ``[span_start[b], span_end[b])`` for sequence b."""

    ids: torch.Tensor
    mask: torch.Tensor
    span_start: torch.Tensor
    span_end: torch.Tensor


@dataclass
class PassAttention:
    """What one compressed layer saw during a scoring pass, handed to :meth:`ContextScorer.observe`.

    ``q``: the pass's queries ``[B, H_kv, G, Q, D]``; ``keys``/``values``: the layer's rows ``[B, H_kv, M, D]``
    (the context's held rows, then the pass's own, zeros past a segment's end); ``positions`` ``[B, H_kv, M]``
    (-1 past the end); ``context_rows`` ``[B, H_kv]``: rows before this count are context, after it the
    pass's own (``context_width``: their maximum, a host int); ``visible`` ``[B, H_kv, Q, M]``: what each query
    attends to (causal among its own tokens); ``query_valid`` ``[B, Q]``: False at the pass's padding; ``span``:
    the context positions this pass scores (``ScoringPass``); ``hidden_states`` ``[B, Q, hidden]``: the attention
    module's input for the pass (None unless the scorer asks for it); ``module``, ``scaling``, ``softcap`` as in
    :class:`ScoreInputs`.
    """

    q: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    context_rows: torch.Tensor
    context_width: int
    visible: torch.Tensor
    query_valid: torch.Tensor
    span: ScoringPass
    hidden_states: torch.Tensor | None
    module: nn.Module
    scaling: float
    softcap: float | None


class ContextScorer(Scorer):
    """A scorer whose scores come from extra forward passes over the held context, such as KVzip's
    reconstruction ("repeat the context"). Compress with :func:`adakv.compress_context`, which

    1. runs the context through the model, every layer keeping all its tokens (compacted layout);
    2. runs each :meth:`passes` input after the context: every compressed layer attends over the context
       plus the pass's tokens as usual (so later layers see the right hidden states), hands what it saw to
       :meth:`observe`, then forgets the pass's tokens (the stock sliding-window layers are restored too);
    3. ranks the observed scores (:meth:`finalize`) with the cache's allocator and compacts every layer.

    ``uses_hidden_states``: whether :meth:`observe` needs the attention modules' input hidden states.
    """

    uses_hidden_states: bool = False

    @abstractmethod
    def passes(self, context_ids: torch.Tensor, context_mask: torch.Tensor, tokenizer) -> list[ScoringPass]:
        """The scoring forwards for a context ``[B, L]`` (left-padded, ``context_mask``)."""

    @abstractmethod
    def observe(self, seen: PassAttention, scores: torch.Tensor | None) -> torch.Tensor:
        """Fold one layer's view of one pass into the running scores ``[B, H_kv, C]`` over the context rows
        (C = the longest context segment; None at the first pass)."""

    def finalize(self, scores: torch.Tensor, inputs: ScoreInputs) -> torch.Tensor:
        """The scores ``[B, H_kv, L]`` the allocator ranks, from the observed ones aligned with ``inputs``'
        columns (the held context). Default: as observed."""
        return scores

    def __call__(self, inputs: ScoreInputs) -> torch.Tensor:
        raise ValueError(
            f"{type(self).__name__} scores a context with extra forward passes: compress it with "
            "adakv.compress_context(model, cache, context_ids, tokenizer=...) before asking about it."
        )


def window_attention(inputs: ScoreInputs) -> torch.Tensor:
    """Softmax attention of the last ``w = min(window, Q)`` queries over all keys, fp32 ``[B, H_kv, G, w, L]``.

    Causal (query i of the window sits at column L - w + i), padding keys masked; computed per KV group
    without repeating keys. A padded query row (its own column is padding) sees nothing and gets zeros.
    """
    q, k = inputs.queries, inputs.keys
    bsz, h_kv, seq, dim = k.shape
    w = min(inputs.window, q.shape[2])
    q_win = q[:, :, q.shape[2] - w :].float().reshape(bsz, h_kv, inputs.group_size, w, dim)
    logits = torch.einsum("bhgwd,bhld->bhgwl", q_win, k.float()) * inputs.scaling
    if inputs.softcap is not None:
        logits = torch.tanh(logits / inputs.softcap) * inputs.softcap
    q_col = torch.arange(seq - w, seq, device=k.device)
    k_col = torch.arange(seq, device=k.device)
    allowed = (k_col[None, :] <= q_col[:, None])[None, None] & inputs.valid[:, :, None, :]  # [B, H, w, L]
    allowed = allowed & inputs.valid[:, :, seq - w :, None]  # padded query rows see nothing
    logits = logits.masked_fill(~allowed[:, :, None], float("-inf"))
    return torch.softmax(logits, -1).nan_to_num(0.0)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model``: those with an int ``layer_idx`` whose class name ends in "Attention"."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int) and type(m).__name__.endswith("Attention")
    ]
