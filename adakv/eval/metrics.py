"""Fidelity metrics: how closely a compressed cache reproduces the full cache, however weak the model.

* :func:`greedy_agreement`: length of the greedy continuation that matches the
  full cache's exactly, from the first token on, divided by ``max_new_tokens``
  (1.0 = identical; positions after the first divergence do not count, since
  the two runs then continue different texts).
* :func:`teacher_forced`: the prompt is prefilled (its prefix compressed), then a
  fixed continuation (e.g. the full cache's own greedy output after an instruction
  asked after compression) is fed in one forward; per position the next-token
  KL(p_full || p_compressed) in nats and whether both rank the same token first
  (top-1 agreement), averaged over the continuation.
* :func:`teacher_forced_kl`: the same KL for a real-text continuation of a context.

``cache_factory()`` returns either an empty cache (the metric prefills it, with
``prefill(model, cache, ids)`` if given, e.g. a chunked prefill, else one forward)
or a cache that already holds the prefix, e.g. from :func:`adakv.replay.replay`.
Batch size 1 throughout.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache

from ..cache_kwarg import with_cache
from .haystack import haystack_text

CacheFactory = Callable[[], Cache]
Prefill = Callable[[Any, Cache, torch.Tensor], "torch.Tensor | None"]  # (model, empty cache, ids) -> last logits


def full_cache(model: Any) -> DynamicCache:
    """The reference: an uncompressed ``DynamicCache`` for ``model``."""
    return DynamicCache(config=model.config)


def forward_prefill(model: Any, cache: Cache, ids: torch.Tensor) -> torch.Tensor:
    """The default prefill: one forward; the last position's logits ``[B, vocab]``."""
    with torch.no_grad():
        return model(ids, **with_cache(cache), logits_to_keep=1).logits[:, -1]


@torch.no_grad()
def _feed(
    model: Any, cache: Cache, ids: torch.Tensor, prefix_len: int | None, prefill: Prefill | None = None
) -> torch.Tensor | None:
    """Run the part of ``ids`` the cache does not hold yet, ``ids[:, :prefix_len]`` first (compressed on
    its own, through ``prefill`` when the cache is empty), then the rest. Returns the last position's logits, or
    None if the cache already held all of ``ids`` (or ``prefill`` returned None for it)."""
    held, n = cache.get_seq_length(), ids.shape[1]
    stops = sorted({p for p in (prefix_len, n) if p is not None and p > held})
    if held not in (0, prefix_len, n):
        raise ValueError(f"the cache holds {held} tokens; expected 0, the prefix ({prefix_len}) or the prompt ({n}).")
    logits = None
    for stop in stops:
        if held == 0 and prefill is not None:
            logits = prefill(model, cache, ids[:, :stop])
        else:
            logits = model(ids[:, held:stop], **with_cache(cache), logits_to_keep=1).logits[:, -1]
        held = stop
    return logits


@torch.no_grad()
def greedy_decode(
    model: Any,
    ids: torch.Tensor,
    cache: Cache,
    max_new_tokens: int,
    prefix_len: int | None = None,
    first_token: torch.Tensor | None = None,
    prefill: Prefill | None = None,
) -> torch.Tensor:
    """Exactly ``max_new_tokens`` greedy tokens (EOS does not stop it) after prompt ``ids`` of shape ``(1, n)``.

    ``prefix_len``: prefill ``ids[:, :prefix_len]`` first and append the rest afterwards (question-agnostic).
    ``first_token``: used when ``cache`` already holds all of ``ids`` (the prefill logits do not depend on the
    eviction method, so the caller takes them from the full-cache run). ``prefill``: how an empty cache takes its
    first part (default: one forward).
    """
    logits = _feed(model, cache, ids, prefix_len, prefill)
    if logits is None and first_token is None:
        raise ValueError("the cache already holds the whole prompt: pass first_token.")
    token = logits.argmax(-1) if logits is not None else first_token.reshape(1).to(ids.device)
    out = [token]
    for _ in range(max_new_tokens - 1):
        logits = model(token.view(1, 1), **with_cache(cache), logits_to_keep=1).logits[:, -1]
        token = logits.argmax(-1)
        out.append(token)
    return torch.cat(out)


def greedy_agreement(
    model: Any,
    ids: torch.Tensor,
    cache_factory: CacheFactory,
    max_new_tokens: int,
    prefix_len: int | None = None,
    reference: torch.Tensor | None = None,
    prefill: Prefill | None = None,
) -> float:
    """Matching greedy prefix length / ``max_new_tokens`` of the compressed cache against the full cache.

    ``reference``: the full cache's :func:`greedy_decode` output, to reuse across methods. ``prefill``: how the
    compressed cache takes its first part when ``cache_factory()`` returns an empty one (default: one forward).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if reference is None:
        reference = greedy_decode(model, ids, full_cache(model), max_new_tokens, prefix_len)
    cache = cache_factory()
    out = greedy_decode(model, ids, cache, max_new_tokens, prefix_len, first_token=reference[0], prefill=prefill)
    differ = (out != reference[:max_new_tokens]).nonzero()
    return (int(differ[0, 0]) if len(differ) else max_new_tokens) / max_new_tokens


@torch.no_grad()
def continuation_logprobs(
    model: Any,
    context_ids: torch.Tensor,
    continuation_ids: torch.Tensor,
    cache: Cache,
    prefill: Prefill | None = None,
) -> torch.Tensor:
    """Float32 log-probabilities ``[T, vocab]`` of the next token at each of the ``T`` continuation positions,
    the continuation fed in one forward after the (possibly compressed) context (through ``prefill`` when the
    cache is empty)."""
    _feed(model, cache, context_ids, None, prefill)
    logits = model(continuation_ids, **with_cache(cache)).logits[0]
    return F.log_softmax(logits.float(), dim=-1)


def teacher_forced_kl(
    model: Any,
    context_ids: torch.Tensor,
    continuation_ids: torch.Tensor,
    cache_factory: CacheFactory,
    reference: torch.Tensor | None = None,
    prefill: Prefill | None = None,
) -> float:
    """Mean over continuation positions of KL(p_full || p_compressed) in nats (0 = identical distributions).

    ``reference``: the full cache's :func:`continuation_logprobs`, to reuse across methods.
    """
    if reference is None:
        reference = continuation_logprobs(model, context_ids, continuation_ids, full_cache(model))
    logp = continuation_logprobs(model, context_ids, continuation_ids, cache_factory(), prefill)
    return compare_logprobs(reference, logp)["kl"]


@torch.no_grad()
def forced_logprobs(
    model: Any,
    ids: torch.Tensor,
    target: torch.Tensor,
    cache: Cache,
    prefix_len: int | None = None,
    prefill: Prefill | None = None,
    last_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 log-probabilities ``[T, vocab]`` of each of the ``T`` tokens of ``target`` (``(1, T)`` or ``(T,)``)
    as the next token after prompt ``ids`` ``(1, n)`` and the target tokens before it (teacher forcing).

    The cache takes ``ids[:, :prefix_len]`` first (compressed on its own, through ``prefill`` when it is empty),
    then the rest of the prompt and the target in one forward. ``last_logits``: the prompt's last logits when the
    cache already holds all of ``ids`` (or ``prefill`` returns None for it), e.g. the full cache's.
    """
    target = target.reshape(1, -1).to(ids.device)
    n = ids.shape[1]
    prefix_len = None if prefix_len is not None and prefix_len >= n else prefix_len
    held = cache.get_seq_length()
    first = None
    if held == 0:
        first = _feed(model, cache, ids[:, : prefix_len if prefix_len is not None else n], None, prefill)
        held = cache.get_seq_length()
    if held not in (prefix_len, n):
        raise ValueError(f"the cache holds {held} tokens; expected the prefix ({prefix_len}) or the prompt ({n}).")
    rest = torch.cat([ids[:, held:], target[:, :-1]], -1)
    logits = model(rest, **with_cache(cache)).logits[0] if rest.shape[1] else None
    if held == n:  # the prompt's own last logits predict the first target token
        first = first if first is not None else last_logits
        if first is None:
            raise ValueError("the cache already holds the whole prompt: pass last_logits.")
        logits = first.reshape(1, -1) if logits is None else torch.cat([first.reshape(1, -1), logits], 0)
    else:
        logits = logits[n - held - 1 :]
    return F.log_softmax(logits.float(), dim=-1)


def compare_logprobs(reference: torch.Tensor, logp: torch.Tensor) -> dict[str, float]:
    """``kl``: mean over positions of KL(reference || logp) in nats; ``top1``: the fraction of positions where
    both put the same token first. Both ``[T, vocab]`` log-probabilities."""
    kl = (reference.exp() * (reference - logp)).sum(-1)
    top1 = (reference.argmax(-1) == logp.argmax(-1)).float()
    return {"kl": float(kl.mean()), "top1": float(top1.mean())}


def teacher_forced(
    model: Any,
    ids: torch.Tensor,
    target: torch.Tensor,
    cache_factory: CacheFactory,
    prefix_len: int | None = None,
    reference: torch.Tensor | None = None,
    prefill: Prefill | None = None,
    last_logits: torch.Tensor | None = None,
) -> dict[str, float]:
    """Teacher-forced ``{"kl": nats, "top1": fraction}`` of the compressed cache against the full cache over
    ``target`` after prompt ``ids`` (see :func:`forced_logprobs`; question-agnostic: ``prefix_len``).

    ``reference``: the full cache's :func:`forced_logprobs`, to reuse across methods; ``last_logits``: the prompt's
    last logits for a cache that already holds the whole prompt (defaults to the full cache's)."""
    if reference is None:
        reference = forced_logprobs(model, ids, target, full_cache(model), prefix_len)
    if last_logits is None:
        last_logits = reference[0]
    logp = forced_logprobs(model, ids, target, cache_factory(), prefix_len, prefill, last_logits)
    return compare_logprobs(reference, logp)


def prose_split(
    tokenizer: Any, context_tokens: int, continuation_tokens: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real text for teacher forcing: ``(1, context_tokens)`` and ``(1, continuation_tokens)`` consecutive token ids
    of the haystack prose (:func:`adakv.eval.haystack.haystack_text`, read cyclically from a seeded sentence start)."""
    text = haystack_text()
    starts = [0] + [i + 2 for i in range(len(text) - 1) if text[i] in ".!?" and text[i + 1] == " "]
    start = random.Random(seed).choice(starts)
    total = context_tokens + continuation_tokens
    chunk, ids = text[start:], []
    while len(ids) < total:
        chunk += " " + text
        ids = tokenizer(chunk)["input_ids"]
    ids = torch.tensor([ids[:total]], dtype=torch.long)
    return ids[:, :context_tokens], ids[:, context_tokens:]


__all__ = [
    "compare_logprobs",
    "continuation_logprobs",
    "forced_logprobs",
    "forward_prefill",
    "full_cache",
    "greedy_agreement",
    "greedy_decode",
    "prose_split",
    "teacher_forced",
    "teacher_forced_kl",
]
