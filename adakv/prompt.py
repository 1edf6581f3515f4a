"""When a forward is part of the prompt (compressed) and when it is appended whole; chunked prefill."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch

from .cache_kwarg import with_cache

if TYPE_CHECKING:
    from .cache import AdaKVCache


def generate_chunk_size() -> int | None:
    """``prefill_chunk_size`` when called from inside transformers' chunked prefill in ``generate``, else None.

    transformers tells a cache nothing about the chunks of its own prefill loop, so this looks for that loop's
    frame (``GenerationMixin._prefill`` with its ``input_chunks``): a few microseconds per forward.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if (
            frame.f_code.co_name == "_prefill"
            and frame.f_globals.get("__name__", "").startswith("transformers.generation")
            and "input_chunks" in frame.f_locals
        ):
            return int(frame.f_locals["chunk_size"])
        frame = frame.f_back
    return None


class PromptPhase:
    """Decides, once per forward (at the first compressed layer), whether the forward is a prompt chunk.

    The first forward always is. A later one is when it runs inside ``cache.compressing()`` or inside
    ``generate(..., prefill_chunk_size=N)``'s prefill; otherwise (decoding, a question appended to a
    compressed document, a second chat turn) its tokens are appended and kept.
    """

    def __init__(self, context_scorer: bool = False) -> None:
        self.explicit = 0  # depth of cache.compressing() blocks
        self.compressing = False
        self.context_scorer = context_scorer  # the scorer needs adakv.compress_context
        # set by adakv.compress_context: "hold" (keep every context token) or "score" (a scoring pass)
        self.mode: str | None = None
        self.scoring = None  # the current ScoringPass
        self.hidden: dict[int, torch.Tensor] = {}  # attention modules' inputs during a pass, by id(module)
        # set by prefill_in_chunks: the last this many tokens of the forward are a probe (see there)
        self.lookahead = 0
        self.probe_positions: torch.Tensor | None = None  # [B, lookahead]: the probe tokens' own positions
        # set by prefill_in_chunks: real tokens [B] (host int64) each prompt has in all, which sizes every
        # chunk's budget (Selection.per_head)
        self.final_tokens: torch.Tensor | None = None
        self.unsettled = False  # adakv.score_context ran, adakv.settle_context not yet
        self.failed = False  # a forward raised inside a compressed layer: the layers may disagree until reset

    def begin_forward(self, q_len: int, first: bool, window: int) -> None:
        if self.failed:
            raise ValueError(
                "An earlier forward through this AdaKVCache failed part-way (see its error), so its layers may hold "
                "different tokens. Call cache.reset() (or build a new AdaKVCache) before using it again."
            )
        if self.unsettled and self.mode is None:
            raise ValueError(
                "This cache was scored (adakv.score_context) but not compressed yet: call "
                "adakv.settle_context(model, cache) before using it."
            )
        if first and self.context_scorer and self.mode is None:
            raise ValueError(
                "This cache's scorer scores a context with extra forward passes (e.g. KVzip's reconstruction): "
                "compress the context with adakv.compress_context(model, cache, context_ids, tokenizer=...), then "
                "generate from the cache."
            )
        chunk = None
        # generate's last prefill chunk may be a single token (a prompt of k * N + 1): a one-token forward is
        # looked at too, except while torch.compile traces a decode step (frames cannot be walked there; generate's
        # chunked prefill is never traced, as AdaKVCache.is_compileable is False inside it)
        if not self.explicit and (q_len > 1 or not torch.compiler.is_compiling()):
            chunk = generate_chunk_size()
            if chunk is not None and chunk < window:
                raise ValueError(
                    f"generate(prefill_chunk_size={chunk}) is smaller than this AdaKVCache's observation window "
                    f"({window} tokens), which must fit in a chunk. Use prefill_chunk_size >= {window}, or a smaller "
                    "window=."
                )
        self.compressing = first or self.explicit > 0 or chunk is not None or self.mode == "hold"


@contextmanager
def compressing(cache: AdaKVCache) -> Iterator[AdaKVCache]:
    """Inside this block every forward through ``cache`` is a prompt chunk (see :meth:`AdaKVCache.compressing`)."""
    phase = cache.shared.phase
    phase.explicit += 1
    try:
        yield cache
    finally:
        phase.explicit -= 1


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as generate() gives them, counted over real tokens (padding 0), so that a question
    appended later continues them; a bare forward would count the padding too."""
    return (torch.cumsum(mask.long(), -1) - 1).clamp(min=0)


def chunk_bounds(length: int, chunk_size: int, window: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each chunk: ``chunk_size`` tokens each, except that the last one takes at least
    ``window`` tokens (from the one before it), so the prompt's final selection sees a whole observation window."""
    bounds = [(lo, min(lo + chunk_size, length)) for lo in range(0, length, chunk_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < window:
        cut = length - window
        bounds[-2:] = [(bounds[-2][0], cut), (cut, length)]
    return bounds


@contextmanager
def _stock_layers_skip_probe(cache: AdaKVCache, probe: int) -> Iterator[None]:
    """During a forward whose last ``probe`` tokens are a lookahead probe, the stock layers (sliding-window
    ones) store only the tokens before the probe, and attend with the probe appended as usual."""
    from .layer import AdaKVLayer

    def skipping(layer):
        def update(keys, values, *args, **kwargs):
            cut = keys.shape[-2] - probe
            k, v = type(layer).update(layer, keys[..., :cut, :], values[..., :cut, :], *args, **kwargs)
            return torch.cat([k, keys[..., cut:, :]], -2), torch.cat([v, values[..., cut:, :]], -2)

        return update

    stock = [layer for layer in cache.layers if not isinstance(layer, AdaKVLayer)]
    for layer in stock:
        layer.update = skipping(layer)
    try:
        yield
    finally:
        for layer in stock:
            del layer.update


@torch.no_grad()
def prefill_in_chunks(
    model,
    cache: AdaKVCache,
    input_ids: torch.Tensor,
    chunk_size: int,
    attention_mask: torch.Tensor | None = None,
    lookahead: bool = True,
    hold_final: bool = False,
) -> torch.Tensor:
    """Feed a long prompt (a document) through ``model`` in chunks of ``chunk_size`` tokens, compressing
    after each chunk, so the K/V held never exceeds the budget of the tokens seen plus one chunk.

    ``hold_final=True`` (opt-in): the whole prompt's length is known here, so every chunk is cut back to the
    budget the *whole* prompt gets (capped at the tokens seen) instead: the early chunks lose nothing until
    the final budget is reached, and the peak (the final budget plus the last chunk) is the same, only
    reached earlier. Measured on SmolLM2 at 4k (8 samples) it helped three cells and cost DefensiveKV at 0.2
    most of its needles, so it is not the default. An int budget (tokens per head) is the same either way.

    ``lookahead`` (default): every chunk but the last is scored as a one-shot prefill would score it, from
    the prompt's *final* observation window (its last ``window`` tokens: the question, when the prompt ends
    with one). Those tokens are run after the chunk as a probe, at their own positions, attending over what
    the cache holds plus the chunk; the scorer sees them as its window; then they are forgotten (not kept,
    not counted; the stock sliding-window layers never store them). Each chunk then costs ``window`` more
    tokens of compute. The probe's hidden states are approximate (it sees the compressed past, not the whole
    prompt). ``lookahead=False``: each chunk is scored from its own last ``window`` tokens, which are kept.
    Without a lookahead, a question at the end of the prompt is seen only by the last chunk's selection.

    The last chunk holds at least ``window`` tokens (taken from the one before it). Returns the logits of
    the last position ``[B, vocab]``. Afterwards the cache is an ordinary compressed cache:
    ``model.generate(full_ids, past_key_values=cache)`` appends the question and decodes (the question is
    not evicted, unless the cache has a decode policy: see README). ``attention_mask`` (left padding) covers
    ``input_ids``.
    """
    window = cache.policy.selection.window
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < window:
        raise ValueError(
            f"chunk_size must be an int >= the cache's observation window ({window} tokens), got {chunk_size!r}."
        )
    if not isinstance(lookahead, bool):
        raise TypeError(f"lookahead must be True or False, got {lookahead!r}.")
    if not isinstance(hold_final, bool):
        raise TypeError(f"hold_final must be True or False, got {hold_final!r}.")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}.")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}.")
    if cache.get_seq_length():
        raise ValueError("prefill_in_chunks needs an empty cache (a new AdaKVCache, or cache.reset()).")
    length = input_ids.shape[1]
    bounds = chunk_bounds(length, chunk_size, window)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    positions = mask_positions(mask)
    probe = window if lookahead and len(bounds) > 1 else 0
    if probe and not bool(mask[:, -probe:].all()):
        raise ValueError(
            f"lookahead probes with the prompt's last {window} tokens, but some sequence has fewer real tokens: "
            "pass lookahead=False for such a batch."
        )
    phase = cache.shared.phase
    logits = None
    phase.final_tokens = mask.sum(-1).to("cpu", torch.int64) if hold_final else None
    try:
        with compressing(cache):
            for lo, hi in bounds:
                ids, chunk_mask, pos = input_ids[:, lo:hi], mask[:, :hi], positions[:, lo:hi]
                ahead = probe if hi < length else 0
                if ahead:
                    ids = torch.cat([ids, input_ids[:, -ahead:]], -1)
                    chunk_mask = torch.cat([chunk_mask, mask[:, -ahead:]], -1)
                    pos = torch.cat([pos, positions[:, -ahead:]], -1)
                kwargs = {"position_ids": pos}
                if attention_mask is not None or ahead:
                    kwargs["attention_mask"] = chunk_mask
                phase.lookahead = ahead
                phase.probe_positions = positions[:, -ahead:] if ahead else None
                with _stock_layers_skip_probe(cache, ahead) if ahead else nullcontext():
                    out = model(ids, **with_cache(cache), use_cache=True, **kwargs)
                logits = out.logits[:, -1]
    finally:  # the prompt is in (or failed): later forwards (a question, decoding) are neither probed nor sized
        phase.lookahead = 0  # for the whole prompt
        phase.probe_positions = None
        phase.final_tokens = None
    return logits
