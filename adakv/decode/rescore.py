"""Decode-time re-selection with the cache's own scorer and allocator, every few tokens."""

from __future__ import annotations

import torch

from .base import DecodePolicy, DecodeState, check_interval


class Rescore(DecodePolicy):
    """Every ``interval`` decoded tokens, re-score the held tokens and cut back to the budget.

    The held tokens (prompt survivors and decoded ones) are scored by the cache's scorer from the most
    recent ``window`` queries (SnapKV-style observation window: the prompt's last queries at first, then
    the decoded ones), the allocator splits the budget of all tokens seen so far between the heads again
    (Ada-KV may move budget between heads over time), and the rest is evicted; the most recent ``window``
    tokens always stay. With an int budget B the cache then holds at most B + ``interval`` tokens per head
    on average (plus a segment's slack); with a float budget f, f x the tokens seen + ``interval``.

    Cost: one scoring of the held tokens and one re-layout of the layer per ``interval`` tokens.
    Cross-layer allocators are refused (their split is decided across one forward's layers).

    Each sequence counts its own real tokens (padding of a multi-token append, e.g. a question batched with a
    longer one, does not count) and is re-selected when its own count is due; the others in the batch keep what
    they hold at that step, so a sequence decodes as it would alone. While decoding, every sequence gains one token
    per step, so sequences that start together are re-selected together.
    """

    name = "rescore"

    def __init__(self, interval: int = 16):
        self.interval = check_interval(interval, "Rescore interval")

    def start(self, layer, inputs, choice, previous) -> DecodeState:
        window = inputs.window
        queries = inputs.queries[:, :, -window:].clone()  # not a view: the prompt's queries must be freed
        # the window is the cache's, not the last prompt chunk's length (generate's last chunk may be shorter)
        return RescoreState(queries, self.interval, window, layer.n_real)


class RescoreState(DecodeState):
    """``queries``: the most recent (at most ``window``) real queries ``[B, H_q, W, D]``; ``next_at``: host int64
    ``[B]``, the real tokens seen (the layer's ``n_real``, which excludes padding) at which each sequence is
    re-selected next."""

    def __init__(self, queries: torch.Tensor, interval: int, window: int, seen: torch.Tensor):
        self.window = window
        self.queries = queries
        self.interval = interval
        self.next_at = seen + interval

    def after_append(self, layer, module, q, scaling, softcap, hidden, valid) -> None:
        bsz, h_kv, group, q_len, dim = q.shape
        new = q.reshape(bsz, h_kv * group, q_len, dim)
        queries = torch.cat([self.queries, new], 2)
        if valid is not None and not bool(valid.all()):
            # each sequence keeps its own most recent real queries: a padded query is not one
            real = torch.cat([valid.new_ones(bsz, self.queries.shape[2]), valid], 1).to(queries.device)
            take = min(self.window, int(real.sum(1).min()))
            order = torch.arange(real.shape[1], device=queries.device).expand(bsz, -1)
            last = torch.where(real, order, -1).sort(1).values[:, -take:]  # [B, take], ascending
            index = last[:, None, :, None].expand(-1, queries.shape[1], -1, dim)
            self.queries = torch.gather(queries, 2, index)
        else:
            self.queries = queries[:, :, -max(self.window, 1) :]
        seen = layer.n_real  # already counts these tokens, on the host
        rows = seen >= self.next_at
        if bool(rows.any()):
            self.next_at = torch.where(rows, seen + self.interval, self.next_at)
            layer.reselect(self.queries, module, scaling, softcap, None if bool(rows.all()) else rows)
            # the cut started a new state (a prompt cut's start resets every count); the sequences not cut keep theirs
            layer.decode_state.next_at = self.next_at

    def select_batch(self, index: torch.Tensor) -> None:
        self.queries = self.queries[index.to(self.queries.device)]
        self.next_at = self.next_at[index.to("cpu")]
