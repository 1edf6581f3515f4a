"""The two evaluations: task scores (quality) and agreement / KL against the full cache (fidelity).

Each (sample, mode) is prefilled once (:func:`adakv.replay.record_prefill`) and every method x budget cache is
replayed from that record; the full cache (DynamicCache) runs on the same samples. Both return
``(rows, outputs)``: one row per result cell (keyed by :data:`CELL`) and, for quality, every generated answer.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any

import torch

from ..cache import kv_bytes
from ..replay import record_prefill, replay
from .metrics import continuation_logprobs, full_cache, greedy_agreement, greedy_decode, prose_split, teacher_forced_kl
from .progress import Progress
from .tasks import score

CELL = ("task", "length", "mode", "method", "budget")  # what a result row is keyed by


@torch.no_grad()
def _answer(model: Any, tok: Any, cache: Any, prompt: torch.Tensor, first: torch.Tensor | None, max_new: int) -> str:
    """Greedy text after ``prompt``; ``first`` (question-aware replay) is the known first token."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ids = prompt if first is None else torch.cat([prompt, first], -1)
    if first is not None and (max_new == 1 or int(first) in eos):
        new = first[0]
    else:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            do_sample=False,
            max_new_tokens=max_new - (first is not None),
        )
        new = out[0, prompt.shape[1] :]
    return tok.decode(new, skip_special_tokens=True)


def run_quality(args: argparse.Namespace, model: Any, tok: Any, samples: dict) -> tuple[list[dict], list[dict]]:
    """Task scores of the full cache and every method x budget, on the same samples and prefills."""
    cells: dict[tuple, list[tuple[float, float, int]]] = defaultdict(list)
    outputs: list[dict] = []
    progress = Progress(sum(len(v) for v in samples.values()) * len(args.modes), "quality")
    for (task, length), items in samples.items():
        for i, (sample, enc) in enumerate(items):
            for mode in args.modes:
                full = enc.full_ids.to(model.device)
                prefix = full if mode == "aware" else enc.context_ids.to(model.device)
                max_new = args.max_new_tokens or sample.max_new_tokens
                dense = full_cache(model)
                if mode == "agnostic":
                    with torch.no_grad():
                        model(prefix, past_key_values=dense)
                runs = [("full", 1.0, _answer(model, tok, dense, full, None, max_new), 1.0)]
                dense_bytes = kv_bytes(dense)
                record = record_prefill(model, prefix)
                first = record.last_logits.argmax(-1, keepdim=True) if mode == "aware" else None
                for method in args.methods:
                    for budget in args.budgets:
                        cache = replay(model, record, budget, method=method, window=args.window)
                        text = _answer(model, tok, cache, full, first, max_new)
                        runs.append((method, budget, text, cache.kv_bytes() / dense_bytes))
                for method, budget, text, ratio in runs:
                    key, value = (task, length, mode, method, budget), score(sample, text)
                    cells[key].append((value, ratio, full.shape[1]))
                    extra = {"sample": i, "score": value, "text": text, "answers": sample.answers}
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


def run_fidelity(args: argparse.Namespace, model: Any, tok: Any, samples: dict) -> tuple[list[dict], list[dict]]:
    """Greedy agreement (task prompts, each mode) and teacher-forced KL (prose) against the full cache."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    grid = [(m, b) for m in args.methods for b in args.budgets]
    progress = Progress(
        len(args.lengths) * args.samples + sum(len(v) for v in samples.values()) * len(args.modes), "fidelity"
    )
    dev = model.device
    for length in args.lengths:
        for i in range(args.samples):
            ctx, cont = (t.to(dev) for t in prose_split(tok, length, args.continuation_tokens, args.seed * 1000 + i))
            ref = continuation_logprobs(model, ctx, cont, full_cache(model))
            record = record_prefill(model, ctx)
            cells["kl", "prose", length, "teacher_forced", "full", 1.0].append(0.0)
            for m, b in grid:
                factory = lambda: replay(model, record, b, method=m, window=args.window)
                cells["kl", "prose", length, "teacher_forced", m, b].append(
                    teacher_forced_kl(model, ctx, cont, factory, reference=ref)
                )
            progress.step(f"fidelity kl length={length} sample {i + 1}/{args.samples}")
    for (task, length), items in samples.items():
        for i, (_, enc) in enumerate(items):
            for mode in args.modes:
                full, prefix_len = enc.full_ids.to(dev), None if mode == "aware" else enc.context_ids.shape[1]
                ref = greedy_decode(model, full, full_cache(model), args.max_new_tokens, prefix_len)
                record = record_prefill(model, full[:, :prefix_len] if prefix_len else full)
                cells["agreement", task, length, mode, "full", 1.0].append(1.0)
                for m, b in grid:
                    factory = lambda: replay(model, record, b, method=m, window=args.window)
                    cells["agreement", task, length, mode, m, b].append(
                        greedy_agreement(model, full, factory, args.max_new_tokens, prefix_len, reference=ref)
                    )
                progress.step(f"fidelity agreement {task} length={length} sample {i + 1}/{len(items)} {mode}")
    progress.close()
    rows = [{**dict(zip(("metric", *CELL), k)), "value": sum(v) / len(v), "n": len(v)} for k, v in cells.items()]
    return rows, []
