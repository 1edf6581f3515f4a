"""What a decode policy is: what a compressed layer does with the tokens it decodes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..layer import AdaKVLayer
    from ..scorers import ScoreInputs
    from ..selection import Choice, Selection


class DecodeState(ABC):
    """One layer's decode-time state. Its tensors are indexed by sequence first (batch reordering)."""

    @abstractmethod
    def after_append(
        self,
        layer: AdaKVLayer,
        module: nn.Module,
        q: torch.Tensor,
        scaling: float,
        softcap: float | None,
        hidden: torch.Tensor | None,
        valid: torch.Tensor | None,
    ) -> None:
        """Called after new tokens (queries ``q`` ``[B, H_kv, G, Q, D]``; ``valid`` bool ``[B, Q]``, None: all real)
        were appended and attended; may evict through ``layer.evict_rows`` or ``layer.reselect``. Padded queries
        must not count."""

    @abstractmethod
    def select_batch(self, index: torch.Tensor) -> None:
        """Make sequence b's state a copy of sequence ``index[b]``'s (beam search, batch selection)."""

    def rows_kept(self, layer: AdaKVLayer, keep: torch.Tensor) -> None:
        """The cross-layer cascade cut ``layer`` to the rows where ``keep`` ``[B, H, M]`` (row order) is True after
        this state was started: a state that follows the layer's rows must follow. Policies whose
        ``follows_cross_layer_cuts`` is True implement it; the others are refused by :meth:`DecodePolicy.check`."""
        raise NotImplementedError(f"{type(self).__name__} cannot follow a cross-layer cut.")


class DecodePolicy(ABC):
    """Keeps the cache bounded while decoding. Built once with the cache; :meth:`start` gives each layer its
    state after every prompt compaction."""

    name: str = "decode"
    # whether its states follow the cross-layer cascade's later cuts (DecodeState.rows_kept); if not, a cross-layer
    # allocator is refused
    follows_cross_layer_cuts: bool = False

    def check(self, selection: Selection) -> None:
        """Refuse, with a ValueError, a selection this policy cannot work with (called when the cache is built).
        Overrides call this first: every policy scores from the queries of the prompt's last forward, and a
        context scorer (KVzip) compresses after passes of its own, with no such queries."""
        from ..scorers import ContextScorer

        # first: no decode policy works with a context scorer, so the allocator's advice would lead nowhere
        if isinstance(selection.scorer, ContextScorer):
            raise ValueError(
                f"decode={self.name!r} re-scores held tokens from the recent queries, but {selection.scorer!r} scores "
                "a context with its own passes (adakv.compress_context) and has none to start from. Use decode=None "
                "with it (the context is compressed once; the question and the answer are kept), or a query-based "
                "scorer (e.g. method='defensivekv') for a bounded generation."
            )
        if selection.cross_layer and not self.follows_cross_layer_cuts:
            raise ValueError(
                f"decode={self.name!r} keeps per-layer state that cannot follow {selection.allocator!r}, which splits "
                "one budget across layers and cuts earlier layers again after their own cut. Use a per-layer "
                "allocator (uniform, adakv, pyramidkv), or decode='h2o' (it follows those cuts)."
            )

    @abstractmethod
    def start(
        self, layer: AdaKVLayer, inputs: ScoreInputs, choice: Choice, previous: DecodeState | None
    ) -> DecodeState:
        """The layer's state after its storage was rebuilt from ``inputs``' candidates with ``choice.keep``."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


def check_interval(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    return value
