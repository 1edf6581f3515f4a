"""Where a decode step's time goes: ``torch.profiler`` over decoded tokens for DynamicCache, StaticCache and
AdaKVCache, one after another in one process, each after its own prefill of the same prompt.

    python benchmarks/decode_profile.py --length 2324 --steps 32 --threads 2 --out benchmarks/results/decode_profile_cpu
    python benchmarks/decode_profile.py --device cuda --model llama3-8b-shape --dtype bfloat16 --length 32768 \
        --out benchmarks/results/decode_profile_h100    # Llama-3.1-8B's shape, random weights

Writes ``profile.json`` (command, machine, versions, date; per cache: ms/token over the profiled steps and the ops
that took the most self time, as calls and milliseconds per decoded token) and ``summary.md``. On CUDA the ops are
ranked by their device time and kernel launches are counted. The same number of steps is timed without the
profiler just before (its overhead is not uniform over ops); take speed from ``adakv-bench speed``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, StaticCache

import adakv
from adakv import AdaKVCache, with_cache
from adakv.eval.cli import add_model_args, load_model
from adakv.eval.runinfo import run_info, summary_header


def _caches(model, args) -> dict:
    return {
        "DynamicCache": lambda: DynamicCache(config=model.config),
        "StaticCache": lambda: StaticCache(
            config=model.config, max_cache_len=args.length + args.warmup + 2 * args.steps
        ),
        f"AdaKVCache({args.method}, {args.budget})": lambda: AdaKVCache(model, args.budget, method=args.method),
    }


@torch.no_grad()
def _profile(model, make_cache, ids: torch.Tensor, args) -> dict:
    cuda = ids.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cache = make_cache()
    token = model(ids, **with_cache(cache), logits_to_keep=1).logits[:, -1:].argmax(-1)
    for _ in range(args.warmup):  # first steps (lazy allocations, the first growth) stay out of the profile
        token = model(token, **with_cache(cache)).logits[:, -1:].argmax(-1)
    plain = []  # the same number of steps without the profiler first: its overhead is not uniform over ops
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        token = model(token, **with_cache(cache)).logits[:, -1:].argmax(-1)
        sync()
        plain.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        steps = []
        for _ in range(args.steps):
            start = time.perf_counter()
            token = model(token, **with_cache(cache)).logits[:, -1:].argmax(-1)
            sync()
            steps.append(time.perf_counter() - start)
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ranked = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)
    per_step = args.steps
    rows = [
        {
            "op": e.key,
            "calls_per_token": round(e.count / per_step, 2),
            "self_ms_per_token": round(getattr(e, key, 0) / 1e3 / per_step, 3),
            "self_cpu_ms_per_token": round(e.self_cpu_time_total / 1e3 / per_step, 3),
        }
        for e in ranked[: args.rows]
    ]
    total_self = sum(getattr(e, key, 0) for e in events) / 1e3 / per_step
    launches = sum(e.count for e in events if "cudaLaunchKernel" in e.key or "cuLaunchKernel" in e.key) / per_step
    ops = sum(e.count for e in events if e.key.startswith("aten::")) / per_step
    return {
        "ms_per_token_unprofiled": round(1e3 * statistics.mean(plain), 2),
        "ms_per_token_profiled": round(1e3 * statistics.mean(steps), 2),
        "ms_per_token_median": round(1e3 * statistics.median(steps), 2),
        "self_ms_per_token_all_ops": round(total_self, 2),
        "aten_calls_per_token": round(ops, 1),
        "kernel_launches_per_token": round(launches, 1) if cuda else None,
        "kv_bytes": adakv.kv_bytes(cache),
        "top_ops": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--length", type=int, default=2324, help="prompt tokens (random ids, seeded)")
    ap.add_argument("--steps", type=int, default=32, help="decoded tokens profiled")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--method", default="ada-snapkv")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", type=int, default=15, help="ops kept per cache")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, args.dtype, args.device, args.random_weights)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 100, (1, args.length), generator=gen).to(model.device)
    command = "python benchmarks/decode_profile.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = {
        **run_info(command, model.device),
        "args": {k: str(v) for k, v in vars(args).items()},
        "caches": {name: _profile(model, make, ids, args) for name, make in _caches(model, args).items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(result, indent=1))
    lines = [
        *summary_header("Decode-step profile", result),
        "ms/token: the mean over the steps before the profiled ones (the same count) and over the profiled steps "
        "(with the profiler's overhead); self ms: the op's own time per decoded token (device time on CUDA), "
        "profiled.",
    ]
    for name, r in result["caches"].items():
        lines += [
            "",
            f"## {name}: {r['ms_per_token_unprofiled']} ms/token unprofiled, {r['ms_per_token_profiled']} profiled "
            f"(median {r['ms_per_token_median']}), "
            f"{r['aten_calls_per_token']} aten calls / token"
            + (f", {r['kernel_launches_per_token']} kernel launches / token" if r["kernel_launches_per_token"] else "")
            + f", K/V {r['kv_bytes'] / 2**20:.1f} MiB",
            "",
            "| op | calls / token | self ms / token |",
            "|---|---|---|",
        ]
        lines += [f"| {o['op']} | {o['calls_per_token']} | {o['self_ms_per_token']} |" for o in r["top_ops"]]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
