"""The two evaluations: task scores (quality) and agreement / KL / top-1 against the full cache (fidelity).

Each (sample, mode) is prefilled once (:func:`adakv.replay.record_prefill`) and every method x budget cache is
replayed from that record; the full cache (DynamicCache) runs on the same samples. A cache that a replay cannot
build is built live instead, over the same prefix: every cache when ``prefill`` (or ``args.prefill_chunk_size``,
a chunked prefill through :func:`adakv.prefill_in_chunks`) is given, the presets whose scorer needs extra passes
over the context (:class:`~adakv.scorers.ContextScorer`, compressed with :func:`adakv.compress_context`), and the
extra named caches of ``caches`` (``label -> (model) -> empty cache``: a decode policy, a chunked prefill, any
cache). Both return ``(rows, outputs)``: one row per result cell (keyed by :data:`CELL`) and, for quality, every
generated answer.

Modes: ``aware`` (the question is compressed with the context), ``agnostic`` (the context is compressed, then the
question appended) and, for quality, ``multi``: the context is compressed once and every question of the sample
(:func:`adakv.eval.tasks.questions`: each needle key, each chain, each person) is asked from a ``copy.deepcopy`` of
that compressed cache; its rows average over the questions, its outputs hold one entry per question.
"""

from __future__ import annotations

import argparse
import copy
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from ..cache import AdaKVCache, kv_bytes
from ..cache_kwarg import with_cache
from ..critiprefill import CritiPrefill, sparse_prefill
from ..methods import get_method
from ..replay import PrefillRecord, record_prefill, replay
from ..scorers.base import ContextScorer
from .metrics import (
    Prefill,
    compare_logprobs,
    continuation_logprobs,
    forced_logprobs,
    forward_prefill,
    full_cache,
    greedy_agreement,
    greedy_decode,
    prose_split,
    teacher_forced,
)
from .progress import Progress
from .tasks import encode_sample, questions, score

CELL = ("task", "length", "mode", "method", "budget")  # what a result row is keyed by
MODES = ("aware", "agnostic", "multi")
CacheFactory = Callable[[Any], Cache]  # (model) -> an empty cache


def chunked_prefill(chunk_size: int, lookahead: bool = True, hold_final: bool = False) -> Prefill:
    """A :data:`~adakv.eval.metrics.Prefill` feeding an AdaKVCache the prefix in chunks of ``chunk_size`` tokens
    (:func:`adakv.prefill_in_chunks`, compressing after each, with its ``lookahead`` and ``hold_final``); any
    other cache gets one forward."""
    from ..prompt import prefill_in_chunks

    def prefill(model: Any, cache: Cache, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(cache, AdaKVCache):
            return prefill_in_chunks(model, cache, ids, chunk_size, lookahead=lookahead, hold_final=hold_final)
        return forward_prefill(model, cache, ids)

    return prefill


def auto_prefill(tok: Any, chunk_size: int | None = None, lookahead: bool = True, hold_final: bool = False) -> Prefill:
    """How the harness fills a cache it builds live: :func:`adakv.compress_context` when the cache's scorer needs
    extra passes over the context (a ContextScorer such as KVzip; no logits come back), a chunked prefill when
    ``chunk_size`` is given (with ``lookahead`` and ``hold_final``, see :func:`adakv.prefill_in_chunks`), else
    one forward.

    A context scorer's passes do not depend on the budget: the scored cache of the latest prefix is kept per
    policy, and each budget settles a copy of it (:func:`adakv.score_context` / :func:`adakv.settle_context`,
    the same result as compressing from scratch)."""
    chunked = chunked_prefill(chunk_size, lookahead, hold_final) if chunk_size else forward_prefill
    scored: dict[tuple, Any] = {}

    def prefill(model: Any, cache: Cache, ids: torch.Tensor) -> torch.Tensor | None:
        scorer = getattr(getattr(cache, "selection", None), "scorer", None)
        if isinstance(scorer, ContextScorer):
            from ..context import score_context, settle_context

            key = (_policy_key(cache), chunk_size, tuple(ids.shape), ids.cpu().numpy().tobytes())
            if key not in scored:
                scored.clear()  # only the latest (policy, prefix): the grid asks for one policy's budgets in a row
                fresh = copy.deepcopy(cache)
                score_context(model, fresh, ids, tokenizer=tok, chunk_size=chunk_size)
                scored[key] = fresh
            settled = copy.deepcopy(scored[key])
            settle_context(model, settled, budget=cache.selection.budget)
            cache.__dict__.update(settled.__dict__)  # the caller's cache object takes the settled state
            return None
        return chunked(model, cache, ids)

    return prefill


def _policy_key(cache: AdaKVCache) -> tuple:
    """What a scored cache depends on: its policy without the budget."""
    policy, selection = cache.policy, cache.selection
    return tuple(
        repr(x)
        for x in (
            selection.scorer,
            selection.allocator,
            selection.window,
            policy.decode,
            policy.backend,
            policy.prefill_attention,
            policy.reserve,
        )
    )


def _needs_context_pass(method: str) -> bool:
    return isinstance(get_method(method)[0], ContextScorer)


@dataclass
class Contender:
    """One compressed cache of the comparison: its row label (``method``) and ``budget``, and how it is built
    over a prefix: replayed from the record (``factory`` None) or ``factory(model)`` then ``prefill``."""

    method: str
    budget: float | int | None
    factory: CacheFactory | None = None
    prefill: Prefill | None = None

    @torch.no_grad()  # replay() tracks no gradients of its own: scores must not hold autograd graphs (deepcopy)
    def build(self, model: Any, record: PrefillRecord | None, prefix: torch.Tensor, window: int) -> tuple[Cache, Any]:
        """``(cache holding the compressed prefix, its last logits or None)``."""
        if self.factory is None:
            return replay(model, record, self.budget, method=self.method, window=window), record.last_logits
        cache = self.factory(model)
        return cache, (self.prefill or forward_prefill)(model, cache, prefix)

    def empty(self, model: Any, record: PrefillRecord | None, window: int) -> Callable[[], Cache]:
        """A cache factory for the metrics: replayed (holding the record's prefix) or empty (the metric prefills
        it with :attr:`prefill`)."""
        if self.factory is None:
            return torch.no_grad()(lambda: replay(model, record, self.budget, method=self.method, window=window))
        return lambda: self.factory(model)

    def label_budget(self, model: Any, cache: Cache | None = None) -> float | int:
        """The budget for the rows: a custom cache's own (``cache``, or one built to see it), else 1.0."""
        if self.budget is None:
            selection = getattr(cache if cache is not None else self.factory(model), "selection", None)
            self.budget = getattr(selection, "budget", 1.0)
        return self.budget


def contenders(
    args: argparse.Namespace,
    tok: Any,
    caches: Mapping[str, CacheFactory] | None = None,
    prefill: Prefill | None = None,
) -> list[Contender]:
    """The compressed caches a run compares: ``args.methods`` x ``args.budgets`` (replayed, or live with ``prefill``
    / ``args.prefill_chunk_size`` / a ContextScorer), then the named ``caches`` (live, prefilled with ``prefill``,
    else :func:`auto_prefill`)."""
    chunk = getattr(args, "prefill_chunk_size", None)
    lookahead = not getattr(args, "no_lookahead", False)
    hold_final = getattr(args, "hold_final", False)
    critiprefill = getattr(args, "critiprefill", None)  # CritiPrefill parameters, or None
    options = {} if getattr(args, "chunk_scores", None) is None else {"chunk_scores": args.chunk_scores}
    live = prefill if prefill is not None else auto_prefill(tok, chunk, lookahead, hold_final)
    window = args.window
    out = []
    if critiprefill is not None:  # the full cache's prefill made sparse, no eviction
        out.append(Contender("full+critiprefill", 1.0, full_cache, sparse_dense_prefill(critiprefill)))
    for method in args.methods:
        for budget in args.budgets:
            if prefill is not None or chunk or critiprefill is not None or _needs_context_pass(method):

                def factory(model: Any, m: str = method, b: float | int = budget) -> Cache:
                    sparse = None if critiprefill is None else CritiPrefill(**critiprefill)
                    return AdaKVCache(model, b, method=m, window=window, prefill_attention=sparse, **options)

                label = method if critiprefill is None else f"{method}+critiprefill"
                out.append(Contender(label, budget, factory, live))
            else:
                out.append(Contender(method, budget))
    for label, factory in (caches or {}).items():
        out.append(Contender(label, None, factory, live))
    return out


def sparse_dense_prefill(params: Mapping[str, Any]) -> Prefill:
    """A :data:`~adakv.eval.metrics.Prefill` running one forward inside :func:`adakv.sparse_prefill` (a fresh
    :class:`~adakv.CritiPrefill` of ``params`` each time), for a cache without eviction."""
    from ..attention import restore_attention

    def prefill(model: Any, cache: Cache, ids: torch.Tensor) -> torch.Tensor:
        restore_attention(model)  # an AdaKVCache built earlier in the run switched the model to adakv's attention
        with sparse_prefill(model, CritiPrefill(**params)):
            return forward_prefill(model, cache, ids)

    return prefill


@torch.no_grad()
def _answer(model: Any, tok: Any, cache: Any, prompt: torch.Tensor, first: torch.Tensor | None, max_new: int) -> str:
    """Greedy text after ``prompt``; ``first`` (question-aware, the cache holds the prompt) is the known first
    token."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ids = prompt if first is None else torch.cat([prompt, first], -1)
    if first is not None and (max_new == 1 or int(first) in eos):
        new = first[0]
    else:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **with_cache(cache),
            do_sample=False,
            max_new_tokens=max_new - (first is not None),
        )
        new = out[0, prompt.shape[1] :]
    return tok.decode(new, skip_special_tokens=True)


def run_quality(
    args: argparse.Namespace,
    model: Any,
    tok: Any,
    samples: dict,
    caches: Mapping[str, CacheFactory] | None = None,
    prefill: Prefill | None = None,
) -> tuple[list[dict], list[dict]]:
    """Task scores of the full cache and every method x budget (and every named cache of ``caches``), on the same
    samples and prefixes. ``samples``: ``(task, length) -> [(sample, encoded)]``; ``args``: ``modes``, ``methods``,
    ``budgets``, ``window``, ``max_new_tokens`` (None: per task), optionally ``prefill_chunk_size``."""
    cells: dict[tuple, list[tuple[float, float, int]]] = defaultdict(list)
    outputs: list[dict] = []
    grid = contenders(args, tok, caches, prefill)
    progress = Progress(sum(len(v) for v in samples.values()) * len(args.modes), "quality")
    dev = model.device
    for (task, length), items in samples.items():
        for i, (sample, enc) in enumerate(items):
            for mode in args.modes:
                if mode not in MODES:
                    raise ValueError(f"Unknown mode {mode!r}. Valid modes: {', '.join(MODES)}.")
                asked = [(sample, enc)]
                if mode == "multi":
                    asked = [(q, encode_sample(tok, q)) for q in questions(sample)]
                    if any(not torch.equal(e.context_ids, enc.context_ids) for _, e in asked):
                        raise ValueError(f"the questions of a {task!r} sample do not share its context prompt.")
                prefix = (enc.full_ids if mode == "aware" else enc.context_ids).to(dev)
                record = None
                if any(c.factory is None for c in grid):
                    record = record_prefill(model, prefix)
                dense = full_cache(model)
                dense_logits = forward_prefill(model, dense, prefix)
                results = [("full", 1.0, *_ask(model, tok, args, mode, dense, dense_logits, asked))]
                for contender in grid:
                    cache, logits = contender.build(model, record, prefix, args.window)
                    budget = contender.label_budget(model, cache)
                    first_logits = logits if logits is not None else dense_logits
                    results.append(
                        (contender.method, budget, *_ask(model, tok, args, mode, cache, first_logits, asked))
                    )
                dense_bytes = results[0][3]
                for method, budget, texts, nbytes in results:
                    for j, ((q, qenc), text) in enumerate(zip(asked, texts)):
                        key, value = (task, length, mode, method, budget), score(q, text)
                        cells[key].append((value, nbytes / dense_bytes, qenc.full_ids.shape[1]))
                        extra = {"sample": i, "score": value, "text": text, "answers": q.answers}
                        if mode == "multi":
                            extra["question"] = j
                        if len(sample.meta.get("depths", [])) == 1:
                            extra["depth"] = sample.meta["depths"][0]
                        outputs.append({**dict(zip(CELL, key)), **extra})
                progress.step(f"quality {task} length={length} sample {i + 1}/{len(items)} {mode}")
    progress.close()
    stats = ("score", "kv_ratio", "prompt_tokens")
    rows = [
        {**dict(zip(CELL, k)), **{s: sum(x[j] for x in v) / len(v) for j, s in enumerate(stats)}, "n": len(v)}
        for k, v in cells.items()
    ]
    return rows, outputs


def _ask(
    model: Any,
    tok: Any,
    args: argparse.Namespace,
    mode: str,
    cache: Cache,
    logits: torch.Tensor,
    asked: list,
) -> tuple[list[str], int]:
    """Answers to the ``asked`` questions from ``cache`` (holding the prefix), and the K/V bytes to report: after
    decoding (aware, agnostic) or of the compressed context before any question (multi)."""
    dev = model.device
    if mode == "multi":
        held = kv_bytes(cache)
        texts = []
        for q, qenc in asked:
            max_new = args.max_new_tokens or q.max_new_tokens
            texts.append(_answer(model, tok, copy.deepcopy(cache), qenc.full_ids.to(dev), None, max_new))
        return texts, held
    (q, qenc) = asked[0]
    max_new = args.max_new_tokens or q.max_new_tokens
    first = logits.argmax(-1, keepdim=True).reshape(1, 1) if mode == "aware" else None
    text = _answer(model, tok, cache, qenc.full_ids.to(dev), first, max_new)
    return [text], kv_bytes(cache)


def run_fidelity(
    args: argparse.Namespace,
    model: Any,
    tok: Any,
    samples: dict,
    caches: Mapping[str, CacheFactory] | None = None,
    prefill: Prefill | None = None,
) -> tuple[list[dict], list[dict]]:
    """Against the full cache, on the same prompts: teacher-forced KL and top-1 agreement on real prose
    (``args.lengths`` x ``args.samples`` contexts, ``args.continuation_tokens`` continued), and for every task
    prompt and mode (open-ended ones included: the instruction comes after the compressed document in ``agnostic``)
    greedy agreement over ``args.max_new_tokens`` tokens and teacher-forced KL / top-1 on the full cache's own
    greedy continuation."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    grid = contenders(args, tok, caches, prefill)
    labels = [(c, c.label_budget(model)) for c in grid]
    progress = Progress(
        len(args.lengths) * args.samples + sum(len(v) for v in samples.values()) * len(args.modes), "fidelity"
    )
    dev = model.device
    need_record = any(c.factory is None for c in grid)
    for length in args.lengths:
        for i in range(args.samples):
            ctx, cont = (t.to(dev) for t in prose_split(tok, length, args.continuation_tokens, args.seed * 1000 + i))
            ref = continuation_logprobs(model, ctx, cont, full_cache(model))
            record = record_prefill(model, ctx) if need_record else None
            for metric, value in (("kl", 0.0), ("top1", 1.0)):
                cells[metric, "prose", length, "teacher_forced", "full", 1.0].append(value)
            for contender, budget in labels:
                factory = contender.empty(model, record, args.window)
                logp = continuation_logprobs(model, ctx, cont, factory(), prefill=contender.prefill)
                for metric, value in compare_logprobs(ref, logp).items():
                    cells[metric, "prose", length, "teacher_forced", contender.method, budget].append(value)
            progress.step(f"fidelity prose length={length} sample {i + 1}/{args.samples}")
    for (task, length), items in samples.items():
        for i, (_, enc) in enumerate(items):
            for mode in args.modes:
                if mode not in ("aware", "agnostic"):
                    raise ValueError(f"fidelity modes are 'aware' and 'agnostic', got {mode!r}.")
                full, prefix_len = enc.full_ids.to(dev), None if mode == "aware" else enc.context_ids.shape[1]
                ref = greedy_decode(model, full, full_cache(model), args.max_new_tokens, prefix_len)
                ref_lp = forced_logprobs(model, full, ref, full_cache(model), prefix_len)
                record = record_prefill(model, full[:, :prefix_len] if prefix_len else full) if need_record else None
                for metric in ("agreement", "top1", "kl"):
                    cells[metric, task, length, mode, "full", 1.0].append(0.0 if metric == "kl" else 1.0)
                for contender, budget in labels:
                    factory = contender.empty(model, record, args.window)
                    cells["agreement", task, length, mode, contender.method, budget].append(
                        greedy_agreement(
                            model,
                            full,
                            factory,
                            args.max_new_tokens,
                            prefix_len,
                            reference=ref,
                            prefill=contender.prefill,
                        )
                    )
                    forced = teacher_forced(
                        model, full, ref, factory, prefix_len, reference=ref_lp, prefill=contender.prefill
                    )
                    for metric, value in forced.items():
                        cells[metric, task, length, mode, contender.method, budget].append(value)
                progress.step(f"fidelity {task} length={length} sample {i + 1}/{len(items)} {mode}")
    progress.close()
    rows = [{**dict(zip(("metric", *CELL), k)), "value": sum(v) / len(v), "n": len(v)} for k, v in cells.items()]
    return rows, []


__all__ = [
    "CELL",
    "MODES",
    "CacheFactory",
    "Contender",
    "auto_prefill",
    "chunked_prefill",
    "contenders",
    "run_fidelity",
    "run_quality",
]
