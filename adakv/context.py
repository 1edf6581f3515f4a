"""Compressing a context whose scorer needs extra forward passes over it (KVzip's reconstruction)."""

from __future__ import annotations

import copy

import torch

from .cache_kwarg import with_cache
from .host import to_device
from .layer import AdaKVLayer
from .prompt import mask_positions, prefill_in_chunks
from .scorers import ContextScorer
from .scorers.base import attention_modules
from .selection import Choice, Selection


@torch.no_grad()
def compress_context(
    model,
    cache,
    context_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    tokenizer=None,
    chunk_size: int | None = None,
    lookahead: bool = True,
) -> None:
    """Put a context (a document) into an empty ``cache`` and compress it, whatever the cache's scorer.

    With a :class:`~adakv.scorers.ContextScorer` (KVzip) the context is first held whole, then the
    scorer's passes run after it (their tokens are forgotten afterwards, the stock sliding-window layers
    restored), then every compressed layer keeps what the observed scores and the allocator choose; a
    cross-layer allocator splits one budget over all layers at once (every layer's scores exist by then).
    These are the two halves :func:`score_context` and :func:`settle_context`. With any other scorer it is
    a plain (or chunked: ``chunk_size``, with :func:`adakv.prefill_in_chunks`' ``lookahead``) prefill.
    Afterwards the cache holds the compressed context: ``model.generate(full_ids, past_key_values=cache)``
    appends the question. ``tokenizer``: what the scorer builds its passes' prompts with (KVzip needs it). A
    context scorer's chunks are held whole until its passes ran, so they are never probed (``lookahead`` does
    not apply).
    """
    if not isinstance(lookahead, bool):
        raise TypeError(f"lookahead must be True or False, got {lookahead!r}.")
    if not isinstance(cache.selection.scorer, ContextScorer):
        _check_context(cache, context_ids, attention_mask)
        mask = torch.ones_like(context_ids) if attention_mask is None else attention_mask
        _prefill(model, cache, context_ids, mask, chunk_size, lookahead=lookahead)
        return
    score_context(model, cache, context_ids, attention_mask, tokenizer, chunk_size)
    settle_context(model, cache)


def _prefill(model, cache, context_ids: torch.Tensor, mask: torch.Tensor, chunk_size: int | None, lookahead: bool):
    """The context through ``model`` into ``cache``, in one forward or in chunks; positions count real tokens only,
    so the passes and a later question continue them (as generate does)."""
    if chunk_size is None:
        model(
            context_ids,
            attention_mask=mask,
            position_ids=mask_positions(mask),
            **with_cache(cache),
            use_cache=True,
            logits_to_keep=1,
        )
    else:
        prefill_in_chunks(model, cache, context_ids, chunk_size, attention_mask=mask, lookahead=lookahead)


def _check_context(cache, context_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    if cache.get_seq_length():
        raise ValueError("compress_context needs an empty cache (a new AdaKVCache, or cache.reset()).")
    if context_ids.dim() != 2:
        raise ValueError(f"context_ids must be [batch, seq], got shape {tuple(context_ids.shape)}.")
    if attention_mask is not None and attention_mask.shape != context_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must match context_ids {tuple(context_ids.shape)}."
        )


@torch.no_grad()
def score_context(
    model,
    cache,
    context_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    tokenizer=None,
    chunk_size: int | None = None,
) -> None:
    """The first half of :func:`compress_context` for a context scorer: hold the context whole and run the
    scorer's passes. The cache is then *scored*: it holds everything until :func:`settle_context`. Scoring
    does not depend on the budget, so a budget sweep scores once and settles copies::

        score_context(model, cache, ids, tokenizer=tok)
        for budget in (0.1, 0.2, 0.5):
            settled = copy.deepcopy(cache)
            settle_context(model, settled, budget=budget)
    """
    scorer = cache.selection.scorer
    if not isinstance(scorer, ContextScorer):
        raise ValueError(
            f"score_context runs a ContextScorer's passes; this cache's scorer is {type(scorer).__name__}. "
            "Use compress_context (a plain prefill for it)."
        )
    _check_context(cache, context_ids, attention_mask)
    mask = torch.ones_like(context_ids) if attention_mask is None else attention_mask
    passes = scorer.passes(context_ids, mask, tokenizer)  # checks the tokenizer before any work
    phase = cache.shared.phase
    layers = [layer for layer in cache.layers if isinstance(layer, AdaKVLayer)]
    hooks = []
    try:
        phase.mode = "hold"
        # held whole: nothing is selected until the passes ran, so a chunked prefill has no lookahead
        _prefill(model, cache, context_ids, mask, chunk_size, lookahead=False)
        stock = {i: copy.deepcopy(layer) for i, layer in enumerate(cache.layers) if not isinstance(layer, AdaKVLayer)}
        seen = [layer.seen for layer in layers]
        n_real = mask.sum(-1)
        phase.mode = "score"
        if scorer.uses_hidden_states:
            for module in attention_modules(model):
                hooks.append(module.register_forward_pre_hook(_keep_hidden(phase), with_kwargs=True))
        for step in passes:
            phase.scoring = step
            ids, pass_mask = step.ids.to(context_ids.device), step.mask.to(context_ids.device)
            full_mask = torch.cat([mask, pass_mask], -1)
            # positions continue after each sequence's real context tokens
            position_ids = n_real[:, None] + (torch.cumsum(pass_mask, -1) - 1).clamp(min=0)
            # logits_to_keep=1: the pass's logits are not used (all of them would be [n, vocab], 400 MB at 2k)
            model(
                ids,
                attention_mask=full_mask,
                position_ids=position_ids,
                **with_cache(cache),
                use_cache=True,
                logits_to_keep=1,
            )
            for i, layer in stock.items():  # the pass's tokens are forgotten by the stock layers too
                cache.layers[i] = copy.deepcopy(layer)
            for layer, count in zip(layers, seen):
                layer.seen = count
            phase.hidden.clear()
    finally:
        for hook in hooks:
            hook.remove()
        phase.mode, phase.scoring = None, None
        phase.hidden.clear()
    phase.unsettled = True


def settle_context(model, cache, budget: float | int | None = None) -> None:
    """The second half of :func:`compress_context`: every compressed layer of a scored cache
    (:func:`score_context`) keeps what its observed scores and the allocator choose. ``budget``: settle to
    this budget instead of the one the cache was built with (the cache's selection then says so)."""
    layers = [layer for layer in cache.layers if isinstance(layer, AdaKVLayer)]
    if any(layer.context_scores is None for layer in layers):
        raise ValueError("settle_context needs a cache scored by score_context (and not settled yet).")
    if budget is not None:
        old = cache.selection
        selection = Selection(budget, old.scorer, old.allocator, old.window)
        if cache.policy.decode is not None:
            cache.policy.decode.check(selection)
        cache.policy.selection = selection
    _settle(cache, layers, attention_modules(model))
    cache.shared.phase.unsettled = False


def _keep_hidden(phase):
    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        phase.hidden[id(module)] = hidden
        return None

    return hook


def _settle(cache, layers: list[AdaKVLayer], modules: list[torch.nn.Module]) -> None:
    """One selection per layer from the observed scores; with a cross-layer allocator, one over all layers."""
    by_index = {m.layer_idx: m for m in modules}
    selection = cache.selection
    ranked = []
    for idx, layer in enumerate(cache.layers):
        if isinstance(layer, AdaKVLayer):
            inputs, scores = layer.context_ranking(by_index.get(idx))
            ranked.append((layer, inputs, scores))
    if not selection.cross_layer:
        for layer, inputs, scores in ranked:
            layer.settle_context(inputs, selection.select(inputs, layer.n_real, scores=scores))
        return
    rankings = [selection.rank(inputs, layer.n_real, scores) for layer, inputs, scores in ranked]
    if any(r is None for r in rankings):  # within budget: every layer keeps its context whole
        for layer, inputs, _ in ranked:
            layer.settle_context(inputs, Choice(inputs.valid.clone()))
        return
    heads = rankings[0].ranked.shape[1]
    total = rankings[0].budget * heads * len(rankings)
    masks = selection.allocator.across_layers([r.ranked for r in rankings], total)
    for (layer, inputs, _), r, mask in zip(ranked, rankings, masks):
        keep = torch.where(to_device(r.whole, mask.device)[:, None, None], inputs.valid, mask & inputs.valid)
        layer.settle_context(inputs, Choice(keep, r.raw, r.ranked, r.scores))
