"""What compression adds to a prefill: time, and how often the host waits for the device.

    python benchmarks/prefill_overhead.py --lengths 2048 8192 --threads 2 --out benchmarks/results/prefill_overhead_cpu
    python benchmarks/prefill_overhead.py --device cuda --model llama3-8b-shape --dtype bfloat16 --lengths 32768 \
        --out benchmarks/results/prefill_overhead_h100    # Llama-3.1-8B's shape, random weights

For each prompt length (random ids, seeded) and method, alternated in one process:
- the prefill forward with a DynamicCache and with ``AdaKVCache(model, budget, method=...)`` (synchronized),
  medians of ``--repeats``;
- the time spent in compression (scoring + allocation + compaction: ``AdaKVLayer.compress_dense`` of every
  layer), measured in one separate instrumented prefill per method (not repeated) that synchronizes around each
  call, as a fraction of that prefill (issue #10's goal on a GPU at 32k: <= 5% for ada-snapkv);
- the host's waits for the device: ``adakv.host.to_host`` calls per compressed layer (every deliberate read of
  a device value goes through it), and on CUDA the synchronizing operations ``torch.cuda.set_sync_debug_mode``
  reports during one prefill, against the DynamicCache prefill's own.
Writes ``overhead.json`` (command, machine, versions, date) and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import DynamicCache

from adakv import AdaKVCache, host, with_cache
from adakv.eval.cli import add_model_args, load_model
from adakv.eval.runinfo import run_info, summary_header
from adakv.layer import AdaKVLayer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def _prefill(model, cache, ids) -> float:
    _sync(ids.device)
    start = time.perf_counter()
    model(ids, **with_cache(cache), logits_to_keep=1)
    _sync(ids.device)
    return time.perf_counter() - start


@torch.no_grad()
def _instrumented(model, make_cache, ids) -> dict:
    """One prefill with compress_dense timed (synchronized around each call) and host reads counted."""
    device = ids.device
    spent, reads = [], [0]
    compress, to_host = AdaKVLayer.compress_dense, host.to_host

    def timed(self, *args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        compress(self, *args, **kwargs)
        _sync(device)
        spent.append(time.perf_counter() - start)

    def counted(*tensors):
        reads[0] += 1
        return to_host(*tensors)

    cache = make_cache()
    AdaKVLayer.compress_dense, host.to_host = timed, counted
    try:
        total = _prefill(model, cache, ids)
    finally:
        AdaKVLayer.compress_dense, host.to_host = compress, to_host
    layers = sum(isinstance(layer, AdaKVLayer) for layer in cache.layers)
    return {
        "prefill_s": total,
        "compress_s": sum(spent),
        "compress_fraction": sum(spent) / total,
        "compressed_layers": layers,
        "host_reads_per_layer": reads[0] / max(layers, 1),
        "kv_bytes": cache.kv_bytes(),
    }


@torch.no_grad()
def _cuda_syncs(model, make_cache, ids) -> int | None:
    """Synchronizing CUDA operations during one prefill, as torch's sync debug mode reports them."""
    if ids.device.type != "cuda":
        return None
    cache = make_cache()
    _sync(ids.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(ids, **with_cache(cache), logits_to_keep=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=["ada-snapkv", "defensivekv"])
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, args.dtype, args.device, args.random_weights)
    command = "python benchmarks/prefill_overhead.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    makers = {"DynamicCache": lambda: DynamicCache(config=model.config)}
    for method in args.methods:
        makers[method] = lambda method=method: AdaKVCache(model, args.budget, method=method)
    rows = []
    for length in args.lengths:
        gen = torch.Generator().manual_seed(length)
        ids = torch.randint(100, model.config.vocab_size - 100, (args.batch, length), generator=gen)
        ids = ids.to(model.device)
        for make in makers.values():  # warm-up: lazy initializations, first kernel compilations
            _prefill(model, make(), ids)
        times = {name: [] for name in makers}
        for _ in range(args.repeats):  # alternated: drifts of a shared machine hit every cache alike
            for name, make in makers.items():
                times[name].append(_prefill(model, make(), ids))
        full = statistics.median(times["DynamicCache"])
        full_syncs = _cuda_syncs(model, makers["DynamicCache"], ids)
        for method in args.methods:
            prefill = statistics.median(times[method])
            row = {
                "length": length,
                "batch": args.batch,
                "method": method,
                "budget": args.budget,
                "dynamic_prefill_s": full,
                "adakv_prefill_s": prefill,
                "ratio_to_dynamic": prefill / full,
                "times_s": {"DynamicCache": times["DynamicCache"], method: times[method]},
                **_instrumented(model, makers[method], ids),
                "cuda_syncs": _cuda_syncs(model, makers[method], ids),
                "cuda_syncs_dynamic": full_syncs,
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "times_s"}), flush=True)
    result = {**run_info(command, model.device), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(result, indent=1))
    lines = [
        *summary_header("Prefill overhead of compression", result),
        "| length | batch | method | DynamicCache prefill s | adakv prefill s | ratio | compression share "
        "(instrumented) | host reads / layer | CUDA syncs (Dynamic) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        syncs = "-" if r["cuda_syncs"] is None else f"{r['cuda_syncs']} ({r['cuda_syncs_dynamic']})"
        lines.append(
            f"| {r['length']} | {r['batch']} | {r['method']} | {r['dynamic_prefill_s']:.3f} | "
            f"{r['adakv_prefill_s']:.3f} | {r['ratio_to_dynamic']:.3f} | {r['compress_fraction']:.3f} | "
            f"{r['host_reads_per_layer']:.2f} | {syncs} |"
        )
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
