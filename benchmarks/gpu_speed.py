"""Speed and memory of the compressed cache on a GPU (random weights: speed does not depend on them).

    python benchmarks/gpu_speed.py                      # CUDA, Llama-3.1-8B shape, bf16
    python benchmarks/gpu_speed.py --device cpu --layers 2 --contexts 1024 --hidden 512 --heads 8 --kv-heads 2 \
        --dtype float32 --batches 1 --out gpu_speed_cpu_smoke     # a quick run of the script itself

Measures:
1. decode attention: achieved bandwidth of the ragged kernel (kept K/V bytes / time) vs the device's measured
   copy bandwidth, and its time at budget 0.2 vs sdpa decode attention over the full cache (distinct K and V);
2. compaction time as a fraction of the prefill attention time of one layer;
3. end-to-end greedy decoding, AdaKVCache(0.2) vs DynamicCache, per context and batch: ms/token over the whole
   decode (``--decode-steps`` tokens, so the growth re-layouts are inside it), the median and p99 of the single
   steps, the memory-bound floor (weight bytes + K/V bytes) / copy bandwidth, and peak memory.

How kernels are timed: ``--calls`` calls back to back between two CUDA events (the per-call time is the difference /
calls; medians over ``--repeats`` such blocks), never one call between two events, which would measure the Python
launch cost at small sizes. A kernel and its baseline (ragged vs sdpa, fused vs unfused decode step) run in
alternated blocks. The end-to-end decodes (3.) run once each, DynamicCache first: read them as a check;
``adakv-bench speed`` gives the alternated, repeated end-to-end figures. The calls rotate over enough independent
copies of the inputs that they do not fit in the L2 cache together (a real decode step reads every layer's K/V
cold). The same calls are also captured in one CUDA graph and its replay is timed (``*_graph_s``: the GPU time
without launch overhead; null, with the reason, where capture fails). Prefill timings synchronize before reading the
clock; the decode steps are timed by events recorded between them, read after one final synchronize.
Writes benchmarks/results/<out>.json (or ``--out`` itself if it ends in .json) with the command, device,
versions and date.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from adakv import AdaKVCache, kv_bytes, with_cache
from adakv.eval.cli import add_llama_shape_args, llama_shape, random_llama
from adakv.eval.runinfo import run_info
from adakv.kernels import backend, flash_attention, ops_for, reference
from adakv.storage import RaggedKV

RESULTS = Path(__file__).parent / "results"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _calls(fns: Callable | Sequence[Callable]) -> list[Callable]:
    return [fns] if callable(fns) else list(fns)


def _block(fns: list[Callable], device: str, calls: int) -> float:
    """Seconds per call of ``calls`` calls back to back (rotating over ``fns``): CUDA events around the block."""
    if device == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for i in range(calls):
            fns[i % len(fns)]()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for i in range(calls):
        fns[i % len(fns)]()
    return (time.perf_counter() - t0) / calls


def timed(fns: Callable | Sequence[Callable], device: str, repeats: int, calls: int) -> float:
    """Median seconds per call: ``calls`` calls back to back (rotating over ``fns``) per timed block, after a
    warm-up call of each; ``repeats`` blocks."""
    return timed_alternated([fns], device, repeats, calls)[0]


def timed_alternated(contenders: Sequence, device: str, repeats: int, calls: int) -> list[float]:
    """:func:`timed` of each of ``contenders`` (a callable or a sequence of them), their blocks alternated
    (A, B, A, B, ...) so that a clock or thermal drift falls on all alike; the median of each one's blocks."""
    groups = [_calls(c) for c in contenders]
    for fns in groups:
        for fn in fns:
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in groups]
    for _ in range(repeats):
        for fns, out in zip(groups, times):
            out.append(_block(fns, device, calls))
    return [statistics.median(t) for t in times]


def graph_timed(fns: Sequence[Callable], repeats: int, calls: int) -> tuple[float | None, str | None]:
    """Seconds per call from the replay of one CUDA graph holding ``calls`` calls (rotating over ``fns``), or
    (None, why) if the calls cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
            for fn in fns:
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fns[i % len(fns)]()
    except Exception as err:  # a host sync, a host read or an allocation the capture refuses
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        return None, f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    seconds = timed(graph.replay, "cuda", repeats, 1) / calls
    del graph
    return seconds, None


def _l2_bytes(device: str) -> int:
    if device != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 64 << 20))


def copies_beyond_l2(nbytes: int, device: str, most: int = 64) -> int:
    """How many independent copies of ``nbytes`` of inputs to rotate over so they do not stay in the L2 cache."""
    l2 = _l2_bytes(device)
    return 1 if l2 == 0 or nbytes <= 0 else max(1, min(most, math.ceil(3 * l2 / nbytes)))


def copy_bandwidth(device: str, repeats: int) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted; far larger than the L2 cache)."""
    n = (1 << 30) if device == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / timed(lambda: dst.copy_(src), device, repeats, 10)


def _uneven_lengths(ctx: int, batch: int, h_kv: int, budget: float, device: str) -> torch.Tensor:
    """Uneven head budgets like Ada-KV's: each head between 0.5x and 1.5x the mean, same total."""
    frac = torch.linspace(0.5, 1.5, h_kv, device=device)
    return (frac / frac.mean() * int(ctx * budget)).long().clamp(1, ctx).expand(batch, h_kv).contiguous()


def attention_point(args, ctx: int, batch: int, dtype, bandwidth: float) -> dict:
    """Decode attention alone: ragged kernel over a 0.2 budget vs sdpa over the full cache (distinct K and V)."""
    dev, h_kv, dim, group = args.device, args.kv_heads, args.hidden // args.heads, args.heads // args.kv_heads
    gen = torch.Generator(device=dev).manual_seed(0)
    lengths = _uneven_lengths(ctx, batch, h_kv, args.budget, dev)
    keep = torch.arange(ctx, device=dev)[None, None, :] >= (ctx - lengths)[..., None]
    scaling = dim**-0.5
    full_bytes = 2 * batch * h_kv * ctx * dim * dtype.itemsize
    kept_bytes = 2 * int(lengths.sum()) * dim * dtype.itemsize

    def dense() -> torch.Tensor:
        return torch.randn(batch, h_kv, ctx, dim, device=dev, dtype=dtype, generator=gen)

    # the full cache's copies (each a distinct K and V) and the ragged stores built from them
    n_full = copies_beyond_l2(full_bytes, dev)
    n_ragged = copies_beyond_l2(kept_bytes, dev)
    full_kv = [(dense(), dense()) for _ in range(n_full)]
    stores = [RaggedKV.from_dense(*full_kv[i % n_full], keep) for i in range(n_ragged)]
    q = torch.randn(batch, h_kv, group, 1, dim, device=dev, dtype=dtype, generator=gen)
    ops = ops_for(q)

    def ragged_call(store: RaggedKV) -> Callable[[], torch.Tensor]:
        max_len = store.max_length()
        return lambda: ops.ragged_attention(
            q, store.keys, store.values, store.start, store.length, scaling, None, None, max_len
        )

    ragged = [ragged_call(s) for s in stores]
    q_full = q.reshape(batch, h_kv * group, 1, dim)
    full = [
        (lambda k=k, v=v: F.scaled_dot_product_attention(q_full, k, v, scale=scaling, enable_gqa=True))
        for k, v in full_kv
    ]
    t_ragged, t_full = timed_alternated([ragged, full], dev, args.repeats, args.calls)
    # the fused decode launch (the opt-in triton-fused backend) against the unfused Triton step
    fused_ops = backend("triton-fused", q.device) if ops.name.startswith("triton") else None
    steps = decode_step_ab(stores, q, scaling, ops, fused_ops, dev, args) if fused_ops is not None else None
    flash = flash_ab(stores, q, scaling, t_ragged, dev, args)
    g_ragged, why_ragged = graph_timed(ragged, args.repeats, args.calls) if dev == "cuda" else (None, "not CUDA")
    g_full, why_full = graph_timed(full, args.repeats, args.calls) if dev == "cuda" else (None, "not CUDA")
    # correctness at this size (long segments exercise the split-K merge): fp32 torch reference
    store = stores[0]
    ref = reference.ragged_attention(q, store.keys, store.values, store.start, store.length, scaling)
    err = max_rel_err(ragged[0](), ref)
    del ref
    keys, values = full_kv[0]
    prefill_q = torch.randn(batch, h_kv * group, ctx, dim, device=dev, dtype=dtype, generator=gen)
    prefill = lambda: F.scaled_dot_product_attention(prefill_q, keys, values, is_causal=True, enable_gqa=True)  # noqa: E731
    t_prefill = timed(prefill, dev, max(1, args.repeats // 4), 3)
    prefill_q = None  # frees it (large at long contexts)
    compact = lambda: RaggedKV.from_dense(keys, values, keep)  # noqa: E731
    t_compact = timed(compact, dev, args.repeats, max(1, args.calls // 10))

    return {
        "context": ctx,
        "batch": batch,
        "backend": ops.name,
        "kept_kv_bytes": kept_bytes,
        "full_kv_bytes": full_bytes,
        "input_copies_rotated": {"ragged": n_ragged, "full": n_full},
        "ragged_decode_attention_s": t_ragged,
        "full_sdpa_decode_attention_s": t_full,
        "ratio_vs_full": t_ragged / t_full,
        "ragged_decode_attention_graph_s": g_ragged,
        "full_sdpa_decode_attention_graph_s": g_full,
        "graph_ratio_vs_full": g_ragged / g_full if g_ragged and g_full else None,
        "graph_not_timed": {k: v for k, v in (("ragged", why_ragged), ("full", why_full)) if v} or None,
        "max_rel_err_vs_reference": err,
        "achieved_bandwidth_GBps": kept_bytes / t_ragged / 1e9,
        "fraction_of_copy_bandwidth": kept_bytes / t_ragged / bandwidth,
        "graph_fraction_of_copy_bandwidth": kept_bytes / g_ragged / bandwidth if g_ragged else None,
        "full_fraction_of_copy_bandwidth": full_bytes / t_full / bandwidth,
        "decode_step_fused_vs_unfused": steps,
        "flash_vs_triton": flash,
        "compaction_s": t_compact,
        "prefill_attention_s": t_prefill,
        "compaction_fraction_of_prefill_attention": t_compact / t_prefill,
    }


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference from the reference, relative to the reference's largest magnitude (fp32)."""
    want = want.float()
    return float((got.float() - want).abs().max() / want.abs().max())


def flash_ab(stores: list[RaggedKV], q: torch.Tensor, scaling: float, t_triton: float, dev: str, args) -> dict:
    """The ``flash`` backend's decode attention (torch's varlen flash, each segment one sequence) on the same
    stores, against the Triton kernel's time ``t_triton``; or why it did not run."""
    why = flash_attention.unavailable(q.device)
    if why is None and not flash_attention.takes(q, None, None):
        why = f"flash takes fp16/bf16 and head_dim a multiple of 8 up to {flash_attention.MAX_HEAD_DIM} only"
    if why is not None:
        return {"not_run": why}

    def call(store: RaggedKV) -> Callable[[], torch.Tensor]:
        max_len = store.max_length()
        return lambda: flash_attention.decode_attention(
            q, store.keys, store.values, store.start, store.length, scaling, max_len
        )

    calls = [call(s) for s in stores]
    store = stores[0]
    ref = reference.ragged_attention(q, store.keys, store.values, store.start, store.length, scaling)
    err = max_rel_err(calls[0](), ref)
    t_flash = timed(calls, dev, args.repeats, args.calls)
    g_flash, why_graph = graph_timed(calls, args.repeats, args.calls)
    return {
        "flash_s": t_flash,
        "flash_over_triton": t_flash / t_triton,
        "flash_graph_s": g_flash,
        "graph_not_timed": why_graph,
        "max_rel_err_vs_reference": err,
    }


def decode_step_ab(stores: list[RaggedKV], q: torch.Tensor, scaling: float, ops, fused_ops, dev: str, args) -> dict:
    """A whole decode step of one layer's cache, fused (``fused_ops.decode_``: one launch appends, attends, merges
    and advances the lengths) vs unfused (``ops``: ``append_`` + ``ragged_attention`` + ``length += 1``). Each call
    is followed by ``length -= 1`` (one tiny launch in both) so that every timed call sees the same lengths."""
    bsz, heads, _, _, dim = q.shape
    gen = torch.Generator(device=dev).manual_seed(1)
    new_k = torch.randn(bsz, heads, 1, dim, device=dev, dtype=q.dtype, generator=gen)
    new_v = torch.randn_like(new_k)
    counters = torch.zeros(bsz * heads, dtype=torch.int32, device=dev)

    def fused(store: RaggedKV) -> Callable[[], torch.Tensor]:
        width = store.max_length() + 1

        def call() -> torch.Tensor:
            out = fused_ops.decode_(
                q, new_k, new_v, store.keys, store.values, store.start, store.length, counters, scaling, None, width
            )
            store.length.sub_(1)
            return out

        return call

    def unfused(store: RaggedKV) -> Callable[[], None]:
        width = store.max_length() + 1

        def call() -> None:
            ops.append_(store.keys, store.values, new_k, new_v, store.start, store.length)
            store.length.add_(1)
            ops.ragged_attention(q, store.keys, store.values, store.start, store.length, scaling, None, None, width)
            store.length.sub_(1)

        return call

    fused_calls, unfused_calls = [fused(s) for s in stores], [unfused(s) for s in stores]
    # correctness first: one fused step against the reference over the same store, the new row included
    store = stores[0]
    got = fused_calls[0]()
    want = reference.ragged_attention(q, store.keys, store.values, store.start, store.length + 1, scaling)
    err = max_rel_err(got, want)
    t_fused, t_unfused = timed_alternated([fused_calls, unfused_calls], dev, args.repeats, args.calls)
    cuda = dev == "cuda"
    g_fused, why_f = graph_timed(fused_calls, args.repeats, args.calls) if cuda else (None, "not CUDA")
    g_unfused, why_u = graph_timed(unfused_calls, args.repeats, args.calls) if cuda else (None, "not CUDA")
    return {
        "fused_s": t_fused,
        "unfused_s": t_unfused,
        "fused_over_unfused": t_fused / t_unfused,
        "fused_graph_s": g_fused,
        "unfused_graph_s": g_unfused,
        "graph_not_timed": {k: v for k, v in (("fused", why_f), ("unfused", why_u)) if v} or None,
        "fused_max_rel_err_vs_reference": err,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@torch.no_grad()
def decode_run(model, ids: torch.Tensor, cache, steps: int, device: str) -> dict:
    """Prefill ``ids``, then ``steps`` greedy steps (each feeds the previous argmax, as generate does)."""
    _sync(device)
    t0 = time.perf_counter()
    out = model(ids, **with_cache(cache), logits_to_keep=1)  # full logits would dwarf the KV
    tok = out.logits[:, -1:].argmax(-1)
    _sync(device)
    t_prefill = time.perf_counter() - t0
    del out
    peak_prefill = torch.cuda.max_memory_allocated() if device == "cuda" else None
    held = kv_bytes(cache)
    if device == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            tok = model(tok, **with_cache(cache)).logits[:, -1:].argmax(-1)
            events[i + 1].record()
        events[-1].synchronize()
        step_s = [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]
    else:
        stamps = [time.perf_counter()]
        for _ in range(steps):
            tok = model(tok, **with_cache(cache)).logits[:, -1:].argmax(-1)
            stamps.append(time.perf_counter())
        step_s = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "prefill_s": t_prefill,
        "peak_memory_prefill_bytes": peak_prefill,
        "kv_bytes_after_prefill": held,
        "kv_bytes": kv_bytes(cache),
        "decode_tokens": steps,
        "decode_ms_per_token": 1e3 * sum(step_s) / steps,
        "decode_p50_ms": 1e3 * percentile(step_s, 50),
        "decode_p99_ms": 1e3 * percentile(step_s, 99),
    }


def e2e_point(args, model, ctx: int, batch: int, bandwidth: float) -> dict:
    dev = args.device
    ids = torch.randint(0, model.config.vocab_size, (batch, ctx), device=dev)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    row = {"context": ctx, "batch": batch}
    for name, make in (
        ("dynamic", lambda: DynamicCache(config=model.config)),
        ("adakv", lambda: AdaKVCache(model, args.budget)),
    ):
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            decode_run(model, ids[:, : min(ctx, 256)], make(), min(args.decode_steps, 32), dev)  # warm-up
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            cache = make()
            result = decode_run(model, ids, cache, args.decode_steps, dev)
        except torch.OutOfMemoryError:
            row[name] = "out of memory"
            if dev == "cuda":
                torch.cuda.empty_cache()
            continue
        result["floor_ms"] = (weight_bytes + result["kv_bytes"]) / bandwidth * 1e3
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if dev == "cuda" else None
        row[name] = result
        del cache
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    add_llama_shape_args(p)
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=20, help="timed blocks per kernel (medians)")
    p.add_argument("--calls", type=int, default=100, help="back-to-back kernel calls per timed block")
    p.add_argument("--decode-steps", type=int, default=256, help="greedy steps timed per end-to-end run")
    p.add_argument("--max-tokens", type=int, default=262144, help="skip end-to-end points with batch*context above")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--out", default="gpu_speed", help="a name (benchmarks/results/<name>.json) or a .json path")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; pass --device cpu for a smoke run of the script")
    if min(args.repeats, args.calls, args.decode_steps) < 1:
        p.error("--repeats, --calls and --decode-steps must be positive")
    dtype = getattr(torch, args.dtype)
    bandwidth = copy_bandwidth(args.device, args.repeats)
    attention = [attention_point(args, ctx, b, dtype, bandwidth) for ctx in args.contexts for b in args.batches]
    e2e = []
    if not args.skip_e2e:
        model = random_llama(args.device, dtype, max(args.contexts) + args.decode_steps + 64, **llama_shape(args))
        e2e = [
            e2e_point(args, model, ctx, b, bandwidth)
            for ctx in args.contexts
            for b in args.batches
            if ctx * b <= args.max_tokens
        ]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    result = {
        **run_info("python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]), args.device),
        "device": device_name,
        "timing": f"kernels: {args.calls} back-to-back calls per CUDA-event pair, inputs rotated past the L2 cache, "
        f"median of {args.repeats}; *_graph_s: CUDA graph replay of the same calls; end-to-end: "
        f"{args.decode_steps} greedy steps, per-step events",
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "attention": attention,
        "end_to_end": e2e,
    }
    out = Path(args.out) if args.out.endswith(".json") else RESULTS / f"{args.out}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
