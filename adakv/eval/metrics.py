"""Fidelity metrics: how closely a compressed cache reproduces the full cache, however weak the model.

* :func:`greedy_agreement`: length of the greedy continuation that matches the
  full cache's exactly, from the first token on, divided by ``max_new_tokens``
  (1.0 = identical; positions after the first divergence do not count, since
  the two runs then continue different texts).
* :func:`teacher_forced_kl`: the context is prefilled (and compressed), then a
  real-text continuation is fed in one multi-token forward (teacher forcing);
  the mean over its positions of KL(p_full || p_compressed) of the next-token
  distributions, in nats.

``cache_factory()`` returns either an empty cache (the metric prefills it) or a
cache that already holds the prefix, e.g. from :func:`adakv.replay.replay`.
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

from ..needle import haystack_text

CacheFactory = Callable[[], Cache]


def full_cache(model: Any) -> DynamicCache:
    """The reference: an uncompressed ``DynamicCache`` for ``model``."""
    return DynamicCache(config=model.config)


@torch.no_grad()
def _feed(model: Any, cache: Cache, ids: torch.Tensor, prefix_len: int | None) -> torch.Tensor | None:
    """Run the part of ``ids`` the cache does not hold yet, ``ids[:, :prefix_len]`` first (compressed on
    its own), then the rest. Returns the last position's logits, or None if the cache already held all of ``ids``."""
    held, n = cache.get_seq_length(), ids.shape[1]
    stops = sorted({p for p in (prefix_len, n) if p is not None and p > held})
    if held not in (0, prefix_len, n):
        raise ValueError(f"the cache holds {held} tokens; expected 0, the prefix ({prefix_len}) or the prompt ({n}).")
    logits = None
    for stop in stops:
        logits = model(ids[:, held:stop], past_key_values=cache, logits_to_keep=1).logits[:, -1]
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
) -> torch.Tensor:
    """Exactly ``max_new_tokens`` greedy tokens (EOS does not stop it) after prompt ``ids`` of shape ``(1, n)``.

    ``prefix_len``: prefill ``ids[:, :prefix_len]`` first and append the rest afterwards (question-agnostic).
    ``first_token``: used when ``cache`` already holds all of ``ids`` (the prefill logits do not depend on the
    eviction method, so the caller takes them from the full-cache run).
    """
    logits = _feed(model, cache, ids, prefix_len)
    if logits is None and first_token is None:
        raise ValueError("the cache already holds the whole prompt: pass first_token.")
    token = logits.argmax(-1) if logits is not None else first_token.reshape(1).to(ids.device)
    out = [token]
    for _ in range(max_new_tokens - 1):
        logits = model(token.view(1, 1), past_key_values=cache, logits_to_keep=1).logits[:, -1]
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
) -> float:
    """Matching greedy prefix length / ``max_new_tokens`` of the compressed cache against the full cache.

    ``reference``: the full cache's :func:`greedy_decode` output, to reuse across methods.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if reference is None:
        reference = greedy_decode(model, ids, full_cache(model), max_new_tokens, prefix_len)
    out = greedy_decode(model, ids, cache_factory(), max_new_tokens, prefix_len, first_token=reference[0])
    differ = (out != reference[:max_new_tokens]).nonzero()
    return (int(differ[0, 0]) if len(differ) else max_new_tokens) / max_new_tokens


@torch.no_grad()
def continuation_logprobs(
    model: Any, context_ids: torch.Tensor, continuation_ids: torch.Tensor, cache: Cache
) -> torch.Tensor:
    """Float32 log-probabilities ``[T, vocab]`` of the next token at each of the ``T`` continuation positions,
    the continuation fed in one forward after the (possibly compressed) context."""
    _feed(model, cache, context_ids, None)
    logits = model(continuation_ids, past_key_values=cache).logits[0]
    return F.log_softmax(logits.float(), dim=-1)


def teacher_forced_kl(
    model: Any,
    context_ids: torch.Tensor,
    continuation_ids: torch.Tensor,
    cache_factory: CacheFactory,
    reference: torch.Tensor | None = None,
) -> float:
    """Mean over continuation positions of KL(p_full || p_compressed) in nats (0 = identical distributions).

    ``reference``: the full cache's :func:`continuation_logprobs`, to reuse across methods.
    """
    if reference is None:
        reference = continuation_logprobs(model, context_ids, continuation_ids, full_cache(model))
    logp = continuation_logprobs(model, context_ids, continuation_ids, cache_factory())
    kl = (reference.exp() * (reference - logp)).sum(-1)
    return float(kl.mean())


def prose_split(
    tokenizer: Any, context_tokens: int, continuation_tokens: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real text for teacher forcing: ``(1, context_tokens)`` and ``(1, continuation_tokens)`` consecutive token ids
    of the haystack prose (:func:`adakv.needle.haystack_text`, read cyclically from a seeded sentence start)."""
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
    "continuation_logprobs",
    "full_cache",
    "greedy_agreement",
    "greedy_decode",
    "prose_split",
    "teacher_forced_kl",
]
