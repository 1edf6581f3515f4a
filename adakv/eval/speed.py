"""The memory and speed suite: what each method costs against a DynamicCache measured in the same run.

For every context length and batch size, the full cache (DynamicCache) runs first, then every method x budget,
on the same prose prompt:

* ``kv_bytes``: K/V bytes the cache holds after the prefill (``adakv.kv_bytes``, slack included);
* ``peak_bytes``: peak memory of prefill + decoding above what was allocated before it: the CUDA allocator's
  peak on GPU; on CPU the process RSS sampled every millisecond by a thread, in a run of its own after the
  timed ones (an estimate: allocations that live shorter than a millisecond can be missed);
* ``prefill_s``: wall time from the ``generate`` call to the prefill's logits (compression included),
  ``compress_s`` the part of it spent selecting and compacting (every call of the layer's compression, timed);
* decoding runs through ``model.generate`` itself (greedy, ``min_new_tokens = max_new_tokens``, so EOS cannot
  stop it early), with the clock read (after a device sync) each time generate has the next logits: once after
  the prefill, then once per decoded token. ``decode_ms``: the whole decode's wall time / its tokens
  (``decode_tokens``), re-layouts of segments that ran out of slack included; ``decode_p50_ms`` /
  ``decode_p99_ms``: median and 99th percentile of the single steps' times (p99: where the re-layouts show).

With ``compile`` (``adakv-bench speed --compile``) every generate gets a ``CompileConfig`` (transformers' default:
inductor, ``reduce-overhead``; on a CPU too): transformers then compiles the decode step of every compileable cache
(the StaticCache; the AdaKVCache, built with ``reserve`` = the decoded tokens), while the DynamicCache stays eager
(transformers never compiles it). Each configuration's first run, outside the timing, pays the compilation. The
reserve is real memory: it counts in ``kv_bytes``. Without ``compile`` nothing is compiled, on a GPU either.

Each figure also appears as a ratio to the full cache's (``*_ratio``). Every figure of a row is the median of its
values over ``repeats`` runs. A configuration that runs out of device memory gets ``error: "out of memory"`` and
empty figures.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import CompileConfig, GenerationConfig, LogitsProcessor, LogitsProcessorList, StaticCache

from ..cache import AdaKVCache, kv_bytes
from ..cache_kwarg import with_cache
from ..layer import AdaKVLayer
from .metrics import full_cache, prose_split
from .progress import Progress


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _return_freed_memory_to_the_os() -> None:
    """glibc keeps freed heap memory, so RSS would not follow live tensors: fix malloc's mmap threshold at
    64 KiB (every tensor buffer gets its own mapping, unmapped when freed) and trim what the heap holds."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (fixing it also stops glibc from raising it)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS is still measured, less tightly
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int | None]]:
    """``{"peak": bytes}`` above the level at entry, filled in at exit (None where it cannot be measured)."""
    result: dict[str, int | None] = {"peak": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak"] = torch.cuda.max_memory_allocated(device) - base
        return
    if not os.path.exists("/proc/self/statm"):
        yield result
        return
    _return_freed_memory_to_the_os()
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result["peak"] = max(peak[0], _rss()) - base


# the layer's method that scores, selects and compacts a (first) prompt chunk
_COMPRESS = "compress_dense"


@contextlib.contextmanager
def compression_timer(device: torch.device) -> Iterator[list[float]]:
    """Seconds spent compressing (every call of the layer's compression inside the block, appended to the list)."""
    spent: list[float] = []
    original = getattr(AdaKVLayer, _COMPRESS)

    def timed(self: AdaKVLayer, *args: Any, **kwargs: Any) -> None:
        _sync(device)
        begin = time.perf_counter()
        original(self, *args, **kwargs)
        _sync(device)
        spent.append(time.perf_counter() - begin)

    setattr(AdaKVLayer, _COMPRESS, timed)
    try:
        yield spent
    finally:
        setattr(AdaKVLayer, _COMPRESS, original)


class _StepClock(LogitsProcessor):
    """Reads the clock (after a device sync) every time ``generate`` has new logits: after the prefill, then after
    every decoded token's forward. ``at_prefill`` runs once, before the first reading (inside the prefill's time)."""

    def __init__(self, device: torch.device, at_prefill: Callable[[], None]):
        self.device, self.at_prefill, self.stamps = device, at_prefill, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.stamps:
            self.at_prefill()
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linear between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _greedy(model: Any, new_tokens: int) -> GenerationConfig:
    """Greedy decoding of exactly ``new_tokens`` tokens (EOS allowed only after them, so never)."""
    base = model.generation_config
    eos = base.eos_token_id
    pad = base.pad_token_id if base.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    return GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=base.bos_token_id,
    )


@torch.no_grad()
def measure(
    model: Any,
    ids: torch.Tensor,
    make_cache: Callable[[], Any],
    decode_steps: int,
    memory: bool = True,
    compile_config: CompileConfig | None = None,
) -> dict[str, Any]:
    """Prefill ``ids`` into a fresh cache and decode ``decode_steps`` greedy tokens through ``model.generate``
    (with ``compile_config`` if given); one measurement. ``memory=False`` skips the peak memory (on CPU its
    sampling thread would perturb the timings)."""
    device = ids.device
    cache = make_cache()
    held: list[int] = []
    clock = _StepClock(device, lambda: held.append(kv_bytes(cache)))
    # one token more than the steps timed: the first comes from the prefill's logits
    config = _greedy(model, decode_steps + 1)
    config.compile_config = compile_config
    config.disable_compile = compile_config is None  # (on CUDA generate compiles a StaticCache unless told not to)
    with peak_memory(device) if memory else contextlib.nullcontext({"peak": None}) as mem:
        with compression_timer(device) as spent:
            _sync(device)
            begin = time.perf_counter()
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                **with_cache(cache),
                generation_config=config,
                logits_processor=LogitsProcessorList([clock]),
            )
    stamps = clock.stamps
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "kv_bytes": held[0],
        "peak_bytes": mem["peak"],
        "prefill_s": stamps[0] - begin,
        "compress_s": sum(spent),
        "decode_tokens": len(steps),
        "decode_ms": 1e3 * (stamps[-1] - stamps[0]) / len(steps) if steps else None,
        "decode_p50_ms": 1e3 * percentile(steps, 50) if steps else None,
        "decode_p99_ms": 1e3 * percentile(steps, 99) if steps else None,
    }


METRICS = (
    "kv_bytes",
    "peak_bytes",
    "prefill_s",
    "compress_s",
    "decode_tokens",
    "decode_ms",
    "decode_p50_ms",
    "decode_p99_ms",
)
RATIOS = ("kv_bytes", "peak_bytes", "prefill_s", "decode_ms", "decode_p50_ms", "decode_p99_ms")


def _attempt(*args: Any) -> dict[str, Any] | None:
    """:func:`measure`, or None if the device ran out of memory (recorded, and the suite goes on)."""
    try:
        return measure(*args)
    except torch.OutOfMemoryError:
        pass
    torch.cuda.empty_cache()  # outside the except block: the traceback no longer holds the tensors
    return None


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    if not runs or any(r is None for r in runs):
        return {**dict.fromkeys(METRICS), "error": "out of memory"}
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    out["kv_bytes"] = runs[0]["kv_bytes"]  # identical across repeats
    return out


def _factory(
    model: Any, method: str, budget: float, window: int, max_len: int, reserve: int | None
) -> Callable[[], Any]:
    if method == "full":
        return lambda: full_cache(model)
    if method == "static":  # the full cache preallocated for the whole generation: no copy per decoded token
        return lambda: StaticCache(config=model.config, max_cache_len=max_len)
    return lambda: AdaKVCache(model, budget, method=method, window=window, reserve=reserve)


def compile_config_for(device: torch.device) -> CompileConfig:
    """transformers' default compilation of the decode step, on any device (it compiles only on GPUs unless told)."""
    config = CompileConfig()
    if device.type != "cuda":
        config._compile_all_devices = True
    return config


def run_speed(args: argparse.Namespace, model: Any, tok: Any) -> tuple[list[dict], list[dict]]:
    """One row per (length, batch, method, budget), the full cache's row first, with ratios to it.

    The configurations of a point are measured interleaved (repeat r of each, then repeat r + 1), so that
    drift of clocks or machine load falls on all of them alike; a warm-up comes first."""
    baselines = [("full", 1.0)] + ([("static", 1.0)] if getattr(args, "static", False) else [])
    configs = baselines + [(m, b) for m in args.methods for b in args.budgets]
    points = [(n, b) for n in args.lengths for b in args.batches]
    progress = Progress(len(points) * len(configs) * args.repeats, "speed")
    on_gpu = model.device.type == "cuda"  # the allocator's peak costs nothing there: taken in every run
    compiled = getattr(args, "compile", False)
    compile_config = compile_config_for(model.device) if compiled else None
    rows: list[dict] = []
    for length, batch in points:
        ctx, _ = prose_split(tok, length, 1, args.seed)
        ids = ctx.to(model.device).expand(batch, -1).contiguous()
        max_len = ids.shape[1] + args.decode_steps + 1  # every token a run holds (StaticCache's size)
        reserve = args.decode_steps + 1 if compiled else None  # a compiled AdaKVCache decodes in its reserve
        factories = [_factory(model, m, b, args.window, max_len, reserve) for m, b in configs]
        if compiled and len(configs) > len(baselines):
            factories[-1]()  # an AdaKVCache switches the model's attention: before any trace, not between two
        for factory in factories:  # warm-up: kernels compiled, allocator and clocks up, a re-layout (> 16 steps)
            if compiled:  # the timed shapes: the compiled step is traced for them here, not inside the timing
                measure(model, ids, factory, min(8, args.decode_steps), False, compile_config)
            else:
                measure(model, ids[:, : min(256, length)], factory, max(4, min(32, args.decode_steps)), False)
        runs: list[list[dict]] = [[] for _ in configs]
        for _ in range(args.repeats):
            for (method, budget), factory, done in zip(configs, factories, runs):
                if None not in done:  # a configuration that ran out of memory is not tried again
                    done.append(_attempt(model, ids, factory, args.decode_steps, on_gpu, compile_config))
                progress.step(f"length={length} batch={batch} {method} {budget:g}")
                if on_gpu:
                    torch.cuda.empty_cache()
        reference: dict[str, Any] = {}
        for (method, budget), factory, done in zip(configs, factories, runs):
            result = _median_of(done)
            if not on_gpu and "error" not in result:  # a separate run, sampled
                # the whole decode: the cache's growth over it is part of the peak
                sampled = measure(model, ids, factory, args.decode_steps, True, compile_config)
                result["peak_bytes"] = sampled["peak_bytes"]
            if method == "full":
                reference = result
            row = {"length": ids.shape[1], "batch": batch, "method": method, "budget": budget, **result}
            for key in RATIOS:
                ok = row[key] is not None and reference.get(key)
                row[f"{key}_ratio"] = row[key] / reference[key] if ok else None
            row["compress_fraction"] = row["compress_s"] / row["prefill_s"] if row["prefill_s"] else None
            row.setdefault("error", None)
            rows.append(row)
    progress.close()
    return rows, []
