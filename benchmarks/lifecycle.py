"""Benchmarks of a compressed layer's life (issue #9) on SmolLM2-135M-Instruct (CPU, fp32, batch 1).

  python benchmarks/lifecycle.py cascade   # prefill of layer-defensivekv vs defensivekv at 2k and 8k tokens
  python benchmarks/lifecycle.py chunked   # an 8k prompt in chunks of 1024: kv_bytes trace, peak RSS, bytes vs budget
  python benchmarks/lifecycle.py decode    # 2,000 greedy tokens after 500 at budget=256: memory bound, ms/token,
                                           # agreement with the full cache, with and without a decode policy
  python benchmarks/lifecycle.py context   # a context scorer's passes (kvzip, kvzip+, kvzip-defensive) against a
                                           # plain prefill: seconds and peak memory, each in a fresh process

Chunked vs one-shot task scores are measured by the harness: adakv-bench quality --prefill-chunk-size N.

Each command prints a table and writes benchmarks/results/lifecycle/<command>.json (the command line, machine,
versions, date and every raw number) and the table as <command>.md (``--out`` chooses another JSON path).
Timed configurations run alternated (A B A B ...) after a warm-up; figures are medians. ``--model tiny`` runs a
tiny random Llama (tests/tiny_models.py, random token prompts) for smoke tests. Set the threads (``--threads`` or
OMP_NUM_THREADS) and run on quiet cores: the timings are only as good as the machine is idle.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import adakv
from adakv import AdaKVCache, H2ODecode, Rescore, kv_bytes, with_cache
from adakv.cache import layer_kv_bytes
from adakv.eval.runinfo import run_info
from adakv.eval.speed import _greedy, compression_timer, peak_memory, percentile
from adakv.layer import AdaKVLayer
from adakv.selection import budget_argument
from adakv.storage import MIN_SLACK, RaggedKV

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "lifecycle"
MIB = 2**20
COMMANDS = ("cascade", "chunked", "decode", "context")
PEAK_CONFIGS = ("adakv-chunked", "adakv-oneshot", "dynamic", "dynamic-chunked")
CONTEXT_CONFIGS = ("dynamic", "ada-snapkv", "kvzip", "kvzip+", "kvzip-defensive")
DECODE_METHODS = ("snapkv", "ada-snapkv", "defensivekv", "h2o")


# -- model, prompts, result files ---------------------------------------------------------------------------------
def load(name: str) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer or None): a registered model (adakv.models), or ``tiny`` (random Llama)."""
    if name == "tiny":
        if str(ROOT / "tests") not in sys.path:
            sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import tiny_model

        return tiny_model("llama", max_position_embeddings=1 << 14), None
    from adakv.models import load_model

    return load_model(name)


def prompt_ids(model: Any, tok: Any, n: int, seed: int) -> torch.Tensor:
    """``[1, n]`` token ids: real prose (the harness's haystack text) for a real model, seeded random ids for tiny."""
    if tok is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(3, model.config.vocab_size, (1, n), generator=gen).to(model.device)
    from adakv.eval.metrics import prose_split

    return prose_split(tok, n, 0, seed)[0].to(model.device)


def metadata(argv: list[str], args: argparse.Namespace, model: Any) -> dict[str, Any]:
    text = model.config.get_text_config(decoder=True)
    return {
        **run_info("python benchmarks/lifecycle.py " + shlex.join(argv), model.device),
        "model": {
            "name": args.model,
            "cls": type(model).__name__,
            "dtype": str(model.dtype).removeprefix("torch."),
            "layers": text.num_hidden_layers,
            "kv_heads": text.num_key_value_heads,
            "head_dim": row_bytes(model) // (2 * model.dtype.itemsize),
        },
        "args": {k: v for k, v in vars(args).items() if k != "func"},
    }


def write(args: argparse.Namespace, result: dict[str, Any], table: str) -> Path:
    path = args.out or RESULTS / (args.command + ("" if args.model == "smollm2" else f"-{args.model}") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1, default=str)
    scalar = r"(?:-?[0-9][0-9.eE+-]*|null|true|false)"
    flat = rf"\[\s+({scalar}(?:,\s+{scalar})*)\s+\]"
    text = re.sub(flat, lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    path.write_text(text + "\n")  # lists of numbers on one line each
    path.with_suffix(".md").write_text(f"`{result['meta']['command']}`\n\n{result['meta']['date']}\n\n{table}\n")
    return path


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


# -- cache geometry -------------------------------------------------------------------------------------------------
def row_bytes(model: Any) -> int:
    """Bytes of one token's K and V in one (sequence, KV head) segment."""
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * head_dim * model.dtype.itemsize


def full_bytes_per_token(model: Any, batch: int = 1) -> int:
    """A DynamicCache's bytes per prompt token when every layer is full attention (SmolLM2, the tiny Llama)."""
    text = model.config.get_text_config(decoder=True)
    return text.num_hidden_layers * batch * text.num_key_value_heads * row_bytes(model)


def held(cache: Any) -> dict[str, Any]:
    """kv_bytes and tokens per compressed segment (a DynamicCache: its length, every layer a segment set)."""
    lengths = [layer.kept_lengths() for layer in cache.layers if isinstance(layer, AdaKVLayer)]
    lengths = [t for t in lengths if t is not None]
    if not lengths:
        n = cache.get_seq_length()
        return {"kv_bytes": kv_bytes(cache), "segments": None, "max_tokens": n, "mean_tokens": float(n)}
    flat = torch.cat([t.reshape(-1) for t in lengths])
    stock = sum(layer_kv_bytes(layer) for layer in cache.layers if not isinstance(layer, AdaKVLayer))
    return {
        "kv_bytes": kv_bytes(cache),
        "segments": flat.numel(),
        "max_tokens": int(flat.max()),
        "mean_tokens": float(flat.double().mean()),
        "stock_bytes": stock,
    }


def mib(value: int | None) -> float | None:
    return None if value is None else value / MIB


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@contextlib.contextmanager
def before_cuts(cache: AdaKVCache) -> Iterator[list[dict[str, int]]]:
    """Each time a layer of ``cache`` is about to cut its segments back (:meth:`RaggedKV.replace`): the cache's
    kv_bytes (that layer then stores what it kept plus the new chunk), the layer's own bytes and segments, and the
    bytes of the dense right-aligned copy of its segments (K and V) that the selection reads."""
    seen: list[dict[str, int]] = []
    original = RaggedKV.replace

    def spy(store: RaggedKV, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
        segments = store.shape[0] * store.shape[1]
        seen.append(
            {"kv": cache.kv_bytes(), "layer": store.nbytes(), "segments": segments, "view": keys.nbytes + values.nbytes}
        )
        original(store, keys, values, keep)

    RaggedKV.replace = spy
    try:
        yield seen
    finally:
        RaggedKV.replace = original


# -- cascade: cross-layer allocation's prefill cost ---------------------------------------------------------------
@torch.no_grad()
def prefill(model: Any, ids: torch.Tensor, cache: Any) -> float:
    begin = time.perf_counter()
    model(ids, **with_cache(cache), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - begin


def run_cascade(args: argparse.Namespace, model: Any, tok: Any) -> tuple[dict, str]:
    first, second = args.methods
    points, rows = [], []
    for length in args.lengths:
        ids = prompt_ids(model, tok, length, args.seed)
        for method in args.methods:  # warm-up: one-time initialisation outside the timings
            prefill(model, ids[:, : min(length, 512)], AdaKVCache(model, args.budget, method=method))
        runs: dict[str, list[dict]] = {m: [] for m in args.methods}
        for _ in range(args.repeats):
            for method in args.methods:  # alternated: A B A B ...
                cache = AdaKVCache(model, args.budget, method=method)
                with compression_timer(model.device) as spent, before_cuts(cache) as cuts:
                    seconds = prefill(model, ids, cache)
                # relayouts: segments re-laid out after their layer's compaction (the cascade's cuts of earlier layers)
                runs[method].append(
                    {"prefill_s": seconds, "compress_s": sum(spent), "relayouts": len(cuts), **held(cache)}
                )
                del cache
                gc.collect()
        med = {m: median([r["prefill_s"] for r in runs[m]]) for m in args.methods}
        pairs = [a["prefill_s"] / b["prefill_s"] for a, b in zip(runs[first], runs[second])]
        point = {
            "length": length,
            "runs": runs,
            "median_prefill_s": med,
            "median_compress_s": {m: median([r["compress_s"] for r in runs[m]]) for m in args.methods},
            "ratio_of_medians": med[first] / med[second],
            "median_of_paired_ratios": median(pairs),
            "paired_ratios": pairs,
        }
        points.append(point)
        for method in args.methods:
            last = runs[method][-1]
            rows.append(
                [
                    length,
                    method,
                    med[method],
                    point["median_compress_s"][method],
                    min(r["prefill_s"] for r in runs[method]),
                    max(r["prefill_s"] for r in runs[method]),
                    last["kv_bytes"] / MIB,
                    last["relayouts"],
                    point["ratio_of_medians"] if method == first else None,
                ]
            )
    table = markdown(
        [
            "tokens",
            "method",
            "prefill s (median)",
            "compress s",
            "min s",
            "max s",
            "K/V MiB",
            "re-layouts",
            f"{first} / {second}",
        ],
        rows,
    )
    table += f"\n\nbudget {args.budget}, batch 1, {args.repeats} alternated repeats; goal: ratio <= 1.3."
    return {"goal_ratio_max": 1.3, "points": points}, table


# -- chunked prefill: memory -------------------------------------------------------------------------------------
@torch.no_grad()
def chunk_trace(args: argparse.Namespace, model: Any, ids: torch.Tensor) -> list[dict]:
    """Feed ``ids`` chunk by chunk inside ``cache.compressing()``; per chunk: bytes and tokens held after it, and
    the largest kv_bytes just before a layer's cut (the peak K/V the cache stores during the chunk, at layer
    granularity; the first chunk is compacted straight from the model's dense K/V, so it has none)."""
    cache = AdaKVCache(model, args.budget, method=args.method)
    rows, per_token, per_row = [], full_bytes_per_token(model), row_bytes(model)
    kept_before = 0
    with before_cuts(cache) as cuts, cache.compressing():
        for lo in range(0, ids.shape[1], args.chunk):
            cuts.clear()
            chunk = ids[:, lo : lo + args.chunk]
            begin = time.perf_counter()
            model(chunk, **with_cache(cache), use_cache=True, logits_to_keep=1)
            seconds = time.perf_counter() - begin
            state = held(cache)
            seen = cache.get_seq_length()
            kept = int(cache.selection.tokens_per_head(torch.tensor([seen])))  # the selection's per-head budget
            rows.append(
                {
                    "chunk": len(rows),
                    "tokens_seen": seen,
                    "kept_per_head": kept,
                    "seconds": seconds,
                    **state,
                    "max_kv_bytes_before_cut": max((c["kv"] for c in cuts), default=None),
                    "max_layer_bytes_before_cut": max((c["layer"] for c in cuts), default=None),
                    # a layer's (kept + chunk) tokens per segment, no slack: what the issue bounds the peak by
                    "layer_kept_plus_chunk_bytes": cuts[0]["segments"] * (kept_before + chunk.shape[1]) * per_row
                    if cuts
                    else None,
                    "max_view_bytes": max((c["view"] for c in cuts), default=None),
                    "full_kv_bytes": seen * per_token,
                    "budget_kv_bytes": state["segments"] * kept * per_row,
                    "bound_kv_bytes": state["segments"] * (kept + MIN_SLACK) * per_row,
                }
            )
            kept_before = kept
    return rows


@torch.no_grad()
def peak_run(args: argparse.Namespace, model: Any, tok: Any, config: str) -> dict[str, Any]:
    """Peak RSS (or CUDA allocator peak) above the level before it, of one prompt's prefill through ``generate``
    (one new token, so the prefill alone) with the cache and chunking of ``config``; a warm-up first."""
    ids = prompt_ids(model, tok, args.length, args.seed)
    chunked = config.endswith("-chunked")

    def run(prompt: torch.Tensor) -> tuple[Any, float]:
        cache = AdaKVCache(model, args.budget, method=args.method) if config.startswith("adakv") else None
        cache = cache if cache is not None else DynamicCache(config=model.config)
        extra = {"prefill_chunk_size": args.chunk} if chunked else {}
        begin = time.perf_counter()
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            **with_cache(cache),
            generation_config=_greedy(model, 1),
            **extra,
        )
        return cache, time.perf_counter() - begin

    return measured(run, ids[:, : min(ids.shape[1], 2 * args.chunk)], ids, config, model.device, "prefill_s")


def measured(run: Callable, warmup: torch.Tensor, ids: torch.Tensor, config: str, device, timing: str) -> dict:
    """``run(warmup)``, then ``run(ids)`` -> (cache, seconds) under :func:`peak_memory`: the config, its peak, its
    seconds (under the key ``timing``) and what the cache holds."""
    run(warmup)
    gc.collect()
    with peak_memory(device) as mem:
        cache, seconds = run(ids)
    return {"config": config, "peak_bytes": mem["peak"], timing: seconds, **held(cache)}


def in_subprocess(args: argparse.Namespace, worker: str, config: str, options: list[str]) -> dict[str, Any]:
    """This script's ``worker`` subcommand for one ``config`` in a fresh process (a clean peak), its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), worker, "--config", config, "--model", args.model]
    cmd += [*options, "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{worker} for {config} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_in_subprocess(args: argparse.Namespace, config: str) -> dict[str, Any]:
    options = ["--length", str(args.length), "--chunk", str(args.chunk), "--budget", str(args.budget)]
    return in_subprocess(args, "peak-worker", config, [*options, "--method", args.method])


def run_chunked(args: argparse.Namespace, model: Any, tok: Any) -> tuple[dict, str]:
    ids = prompt_ids(model, tok, args.length, args.seed)
    trace = chunk_trace(args, model, ids)
    del ids
    gc.collect()
    peaks = [
        peak_run(args, model, tok, c) if args.peak_in_process else peak_in_subprocess(args, c) for c in args.configs
    ]
    by_config = {p["config"]: p for p in peaks}
    full = trace[-1]["full_kv_bytes"]
    dynamic = by_config.get("dynamic", {}).get("kv_bytes")
    last = trace[-1]
    after = {
        "full_kv_bytes": full,
        "full_kv_bytes_measured": dynamic,
        "budget_times_full": full * last["kept_per_head"] / last["tokens_seen"],
        "slack_bytes": last["segments"] * MIN_SLACK * row_bytes(model),
        "chunked_kv_bytes": last["kv_bytes"],
        "chunked_over_full": last["kv_bytes"] / full,
        "chunked_within_budget_plus_slack": last["kv_bytes"] <= last["bound_kv_bytes"],
        "chunked_generate_kv_bytes": by_config.get("adakv-chunked", {}).get("kv_bytes"),
        "oneshot_kv_bytes": by_config.get("adakv-oneshot", {}).get("kv_bytes"),
    }
    if after["oneshot_kv_bytes"]:
        after["chunked_over_oneshot"] = last["kv_bytes"] / after["oneshot_kv_bytes"]
    trace_table = markdown(
        [
            "chunk",
            "tokens seen",
            "K/V MiB after",
            "budget+slack MiB",
            "K/V MiB before cut",
            "layer before cut / (kept+chunk)",
            "view MiB",
            "full MiB",
            "max tok/seg",
        ],
        [
            [
                r["chunk"],
                r["tokens_seen"],
                r["kv_bytes"] / MIB,
                r["bound_kv_bytes"] / MIB,
                mib(r["max_kv_bytes_before_cut"]),
                ratio(r["max_layer_bytes_before_cut"], r["layer_kept_plus_chunk_bytes"]),
                mib(r["max_view_bytes"]),
                r["full_kv_bytes"] / MIB,
                r["max_tokens"],
            ]
            for r in trace
        ],
    )
    reference = by_config.get("dynamic", {}).get("peak_bytes")
    peak_table = markdown(
        ["prefill", "peak MiB", "peak / dynamic", "K/V MiB after prompt", "K/V / full", "prefill s"],
        [
            [
                p["config"],
                mib(p["peak_bytes"]),
                ratio(p["peak_bytes"], reference),
                p["kv_bytes"] / MIB,
                p["kv_bytes"] / full,
                p["prefill_s"],
            ]
            for p in peaks
        ],
    )
    where = "in this process, one after another" if args.peak_in_process else "each in a fresh process"
    table = (
        f"{args.length} tokens, chunks of {args.chunk}, {args.method} at budget {args.budget}\n\n"
        f"(a) kv_bytes after every chunk (cache.compressing() loop)\n\n{trace_table}\n\n"
        f"(b) peak memory of the prefill (generate, 1 new token; {where}; above the level before it)\n\n"
        f"{peak_table}\n\n"
        f"(c) after the prompt: {last['kv_bytes'] / MIB:.2f} MiB = {after['chunked_over_full']:.3f} x full "
        f"(budget {args.budget}; budget x full + slack = {last['bound_kv_bytes'] / MIB:.2f} MiB)"
    )
    return {"trace": trace, "peaks": peaks, "after_prompt": after}, table


# -- decode-time eviction ------------------------------------------------------------------------------------------
class StepTrace(LogitsProcessor):
    """Each time ``generate`` has new logits (after the prefill, then after every decode forward): the clock,
    the cache's kv_bytes and its longest segment. Logits pass through unchanged."""

    def __init__(self, cache: Any):
        self.cache = cache
        self.stamps: list[float] = []
        self.kv: list[int] = []
        self.max_tokens: list[int] = []
        self.mean_tokens: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        state = held(self.cache)
        self.kv.append(state["kv_bytes"])
        self.max_tokens.append(state["max_tokens"])
        self.mean_tokens.append(round(state["mean_tokens"], 2))
        return scores


def policy_name(method: str) -> str:
    return "h2o" if method == "h2o" else "rescore"


def decode_factories(args: argparse.Namespace, model: Any) -> dict[str, Callable[[], Any]]:
    """name -> a new empty cache: the full cache, then per method ``<method>/<policy>`` and ``<method>/none``.
    ``h2o`` is ``scorer="h2o"`` (default allocator) with :class:`~adakv.H2ODecode` (slack = the interval)."""

    def factory(method: str, with_policy: bool) -> Callable[[], Any]:
        kind = {"scorer": "h2o"} if method == "h2o" else {"method": method}

        def make() -> AdaKVCache:
            policy = None
            if with_policy:
                policy = H2ODecode(slack=args.interval) if method == "h2o" else Rescore(interval=args.interval)
            return AdaKVCache(model, args.budget, decode=policy, **kind)

        return make

    out: dict[str, Callable[[], Any]] = {"full": lambda: DynamicCache(config=model.config)}
    for method in args.methods:
        out[f"{method}/{policy_name(method)}"] = factory(method, True)
        out[f"{method}/none"] = factory(method, False)
    return out


@torch.no_grad()
def decode_run(model: Any, prompt: torch.Tensor, cache: Any, tokens: int) -> dict[str, Any]:
    trace = StepTrace(cache)
    begin = time.perf_counter()
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        **with_cache(cache),
        generation_config=_greedy(model, tokens),
        logits_processor=LogitsProcessorList([trace]),
    )
    stamps = trace.stamps
    steps = [1e3 * (b - a) for a, b in zip(stamps, stamps[1:])]
    return {
        "prefill_s": stamps[0] - begin,
        "ms_per_token": (1e3 * (stamps[-1] - stamps[0]) / len(steps)) if steps else None,
        "p50_ms": percentile(steps, 50) if steps else None,
        "p99_ms": percentile(steps, 99) if steps else None,
        "step_ms": [round(s, 4) for s in steps],
        "kv_bytes": trace.kv,
        "max_segment_tokens": trace.max_tokens,
        "mean_segment_tokens": trace.mean_tokens,
        "tokens": out[0, prompt.shape[1] :].tolist(),
        "repr": repr(cache),
    }


@torch.no_grad()
def teacher_forced(model: Any, prompt: torch.Tensor, reference: list[int], cache: Any) -> list[bool]:
    """Feed the full cache's greedy tokens to ``cache`` one at a time; True where the argmax (EOS excluded, as
    ``min_new_tokens`` excludes it in the greedy runs) is the full cache's next token."""
    eos = model.generation_config.eos_token_id
    eos = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    logits = model(prompt, **with_cache(cache), use_cache=True, logits_to_keep=1).logits[0, -1]
    hits = []
    for t, expected in enumerate(reference):
        if t:
            token = torch.tensor([[reference[t - 1]]], device=prompt.device)
            logits = model(token, **with_cache(cache), use_cache=True).logits[0, -1]
        logits[eos] = float("-inf")
        hits.append(int(logits.argmax()) == expected)
    return hits


def agreement(tokens: list[int], reference: list[int]) -> dict[str, Any]:
    same = [a == b for a, b in zip(tokens, reference)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return {
        "greedy_agreement": sum(same) / len(same),
        "first_divergence": first,
        "greedy_prefix_fraction": (len(same) if first is None else first) / len(same),
    }


def run_decode(args: argparse.Namespace, model: Any, tok: Any) -> tuple[dict, str]:
    prompt = prompt_ids(model, tok, args.prompt_tokens, args.seed)
    factories = decode_factories(args, model)
    for factory in factories.values():  # warm-up: one-time initialisation, and past a first re-selection
        decode_run(model, prompt[:, : min(prompt.shape[1], 128)], factory(), min(args.tokens, args.interval + 2))
    runs: dict[str, list[dict]] = {name: [] for name in factories}
    for _ in range(args.repeats):
        for name, factory in factories.items():  # alternated: full, then each method with and without its policy
            runs[name].append(decode_run(model, prompt, factory(), args.tokens))
            gc.collect()
    reference = runs["full"][0]["tokens"]
    compressed = sum(isinstance(layer, AdaKVLayer) for layer in factories[f"{args.methods[0]}/none"]().layers)
    segments = compressed * prompt.shape[0] * model.config.get_text_config(decoder=True).num_key_value_heads
    configs = {}
    for name, done in runs.items():
        first = done[0]
        configs[name] = {
            "ms_per_token": median([r["ms_per_token"] for r in done if r["ms_per_token"] is not None]),
            "p50_ms": median([r["p50_ms"] for r in done if r["p50_ms"] is not None]),
            "p99_ms": median([r["p99_ms"] for r in done if r["p99_ms"] is not None]),
            "prefill_s": median([r["prefill_s"] for r in done]),
            "max_kv_bytes": max(first["kv_bytes"]),
            "kv_bytes_after_prefill": first["kv_bytes"][0],
            "max_segment_tokens": max(first["max_segment_tokens"]),
            "max_mean_segment_tokens": max(first["mean_segment_tokens"]),
            "deterministic": all(r["tokens"] == first["tokens"] and r["kv_bytes"] == first["kv_bytes"] for r in done),
            "cache": first["repr"],
        }
        if name != "full":
            configs[name].update(agreement(first["tokens"], reference))
            if args.teacher_forced:
                hits = teacher_forced(model, prompt, reference, factories[name]())
                configs[name]["teacher_forced_top1"] = sum(hits) / len(hits)
                configs[name]["teacher_forced_hits"] = [int(h) for h in hits]
    bound = segments * (args.budget + args.interval + MIN_SLACK) * row_bytes(model)
    for row in configs.values():
        row["bound_kv_bytes"] = bound
        row["max_kv_over_bound"] = row["max_kv_bytes"] / bound
    for method in args.methods:
        on, off = f"{method}/{policy_name(method)}", f"{method}/none"
        configs[on]["within_bound"] = configs[on]["max_kv_bytes"] <= bound
        configs[on]["overhead_vs_none"] = configs[on]["ms_per_token"] / configs[off]["ms_per_token"] - 1
        pairs = zip(runs[on], runs[off])
        configs[on]["paired_overheads"] = [a["ms_per_token"] / b["ms_per_token"] - 1 for a, b in pairs]
    rows = [
        [
            name,
            r["max_kv_bytes"] / MIB,
            r["max_kv_over_bound"],
            r["max_mean_segment_tokens"],
            r["max_segment_tokens"],
            r["ms_per_token"],
            r["p99_ms"],
            r.get("overhead_vs_none"),
            r.get("greedy_agreement", 1.0),
            r.get("first_divergence"),
            r.get("teacher_forced_top1"),
        ]
        for name, r in configs.items()
    ]
    table = markdown(
        [
            "cache",
            "max K/V MiB",
            "max / bound",
            "max mean tok/seg",
            "max tok/seg",
            "ms/token",
            "p99 ms",
            "overhead",
            "greedy agree",
            "first div",
            "TF top-1",
        ],
        rows,
    )
    table += (
        f"\n\n{args.prompt_tokens}-token prompt, budget={args.budget}, {args.tokens} greedy tokens, interval "
        f"{args.interval}; bound = bytes of (budget + interval + {MIN_SLACK}) tokens x {segments} segments = "
        f"{bound / MIB:.2f} MiB; overhead = ms/token with the policy / without - 1 (goal <= 0.15); "
        f"medians of {args.repeats} alternated runs; agreement against the full cache (DynamicCache)."
    )
    result = {
        "bound_kv_bytes": bound,
        "segments": segments,
        "reference_tokens": reference,
        "configs": configs,
        "runs": {n: [{k: v for k, v in r.items() if k != "repr"} for r in done] for n, done in runs.items()},
    }
    return result, table


# -- context scorers: the cost of the reconstruction passes ----------------------------------------------------------
@torch.no_grad()
def context_run(args: argparse.Namespace, model: Any, tok: Any, config: str) -> dict[str, Any]:
    """Seconds and peak RSS (or CUDA allocator peak) above the level before it, of putting one prompt into a cache:
    a plain prefill (``dynamic``: DynamicCache; ``ada-snapkv``: a compressed one-shot prefill) or
    ``adakv.compress_context`` with a context-scorer preset (its hold prefill, passes and selection); a warm-up on a
    short prompt first."""
    ids = prompt_ids(model, tok, args.length, args.seed)
    if tok is None:  # the tiny model: the passes' prompts come from the tests' toy tokenizer
        from tiny_models import ToyTokenizer

        tok = ToyTokenizer()

    def run(prompt: torch.Tensor) -> tuple[Any, float]:
        if config == "dynamic":
            cache = DynamicCache(config=model.config)
        else:
            cache = AdaKVCache(model, args.budget, method=config)
        begin = time.perf_counter()
        if config in ("dynamic", "ada-snapkv"):
            model(prompt, **with_cache(cache), use_cache=True, logits_to_keep=1)
        else:
            adakv.compress_context(model, cache, prompt, tokenizer=tok)
        return cache, time.perf_counter() - begin

    return measured(run, ids[:, : min(ids.shape[1], 256)], ids, config, model.device, "seconds")


def context_in_subprocess(args: argparse.Namespace, config: str) -> dict[str, Any]:
    return in_subprocess(args, "context-worker", config, ["--length", str(args.length), "--budget", str(args.budget)])


def run_context(args: argparse.Namespace, model: Any, tok: Any) -> tuple[dict, str]:
    """Every config ``args.repeats`` times, alternated, each in a fresh process (or here, ``--in-process``)."""
    runs: dict[str, list[dict]] = {c: [] for c in args.configs}
    for _ in range(args.repeats):
        for config in args.configs:
            one = context_run(args, model, tok, config) if args.in_process else context_in_subprocess(args, config)
            runs[config].append(one)
    summary = {
        c: {
            "seconds": median([r["seconds"] for r in done]),
            "peak_bytes": median([r["peak_bytes"] for r in done if r["peak_bytes"] is not None]),
            "kv_bytes": done[-1]["kv_bytes"],
        }
        for c, done in runs.items()
    }
    base = summary.get("dynamic", {})
    plain = summary.get("ada-snapkv", {})
    rows = [
        [
            c,
            r["seconds"],
            ratio(r["seconds"], plain.get("seconds")),
            mib(r["peak_bytes"]),
            ratio(r["peak_bytes"], base.get("peak_bytes")),
            mib(r["kv_bytes"]),
            ratio(r["kv_bytes"], base.get("kv_bytes")),
        ]
        for c, r in summary.items()
    ]
    table = markdown(
        ["cache", "seconds", "s / ada-snapkv", "peak MiB", "peak / dynamic", "K/V MiB after", "K/V / dynamic"], rows
    )
    table += (
        f"\n\n{args.length}-token prose prompt, budget {args.budget}; medians of {args.repeats} alternated runs, "
        "each in a fresh process after a 256-token warm-up; peak = the process's RSS above its level before the "
        "prefill (CPU) or the CUDA allocator's peak."
    )
    return {"configs": summary, "runs": runs}, table


# -- command line -------------------------------------------------------------------------------------------------
def _chunk_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--length", type=int, default=8192, help="prompt tokens")
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk size")
    p.add_argument("--budget", type=budget_argument, default=0.2)
    p.add_argument("--method", default="ada-snapkv")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    parsers = {
        "cascade": sub.add_parser("cascade", help="prefill time, cross-layer cascade vs per-layer allocation"),
        "chunked": sub.add_parser("chunked", help="chunked prefill: kv_bytes trace, peak RSS, bytes vs budget"),
        "decode": sub.add_parser("decode", help="decode policies: memory bound, ms/token overhead, agreement"),
        "context": sub.add_parser("context", help="a context scorer's passes vs a plain prefill: seconds, peak"),
        "peak-worker": sub.add_parser("peak-worker", help=argparse.SUPPRESS),
        "context-worker": sub.add_parser("context-worker", help=argparse.SUPPRESS),
    }
    for p in parsers.values():
        p.add_argument(
            "--model",
            default="smollm2",
            choices=["smollm2", "tiny"],
            help="SmolLM2-135M-Instruct, or a tiny random Llama for smoke tests (every layer full attention: the "
            "full-cache sizes and bounds are computed for that)",
        )
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        p.add_argument("--seed", type=int, default=0, help="prompt text seed")
        p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/lifecycle/)")
    p = parsers["cascade"]
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--budget", type=budget_argument, default=0.2)
    p.add_argument("--methods", nargs=2, default=["layer-defensivekv", "defensivekv"], metavar=("A", "B"))
    p.add_argument("--repeats", type=int, default=5)
    _chunk_options(parsers["chunked"])
    parsers["chunked"].add_argument("--configs", nargs="+", choices=PEAK_CONFIGS, default=list(PEAK_CONFIGS))
    parsers["chunked"].add_argument(
        "--peak-in-process", action="store_true", help="measure the peaks here, one after another (smoke tests)"
    )
    _chunk_options(parsers["peak-worker"])
    parsers["peak-worker"].add_argument("--config", choices=PEAK_CONFIGS, required=True)
    for name in ("context", "context-worker"):
        p = parsers[name]
        p.add_argument("--length", type=int, default=2048, help="prompt tokens")
        p.add_argument("--budget", type=budget_argument, default=0.2)
    parsers["context"].add_argument("--configs", nargs="+", choices=CONTEXT_CONFIGS, default=list(CONTEXT_CONFIGS))
    parsers["context"].add_argument("--repeats", type=int, default=2)
    parsers["context"].add_argument("--in-process", action="store_true", help="no fresh processes (smoke tests)")
    parsers["context-worker"].add_argument("--config", choices=CONTEXT_CONFIGS, required=True)
    p = parsers["decode"]
    p.add_argument("--prompt-tokens", type=int, default=500)
    p.add_argument("--tokens", type=int, default=2000, help="greedy tokens generated (forced: min_new_tokens)")
    p.add_argument("--budget", type=budget_argument, default=256, help="an int (tokens per KV head)")
    p.add_argument("--interval", type=int, default=16, help="Rescore interval (and H2ODecode slack)")
    p.add_argument("--methods", nargs="+", choices=DECODE_METHODS, default=list(DECODE_METHODS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-teacher-forced", dest="teacher_forced", action="store_false")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace, model: Any) -> None:
    max_pos = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None) or 1 << 62
    if args.command == "cascade" and max(args.lengths) > max_pos:
        parser.error(f"--lengths: the model handles {max_pos} positions")
    if args.command in ("chunked", "peak-worker", "context", "context-worker") and args.length > max_pos:
        parser.error(f"--length: the model handles {max_pos} positions")
    if args.command == "decode":
        if not isinstance(args.budget, int):
            parser.error("decode: --budget must be an int (tokens per KV head); the bound is in tokens")
        if args.prompt_tokens + args.tokens > max_pos:
            parser.error(f"--prompt-tokens + --tokens: the model handles {max_pos} positions")
        if args.tokens < 2:
            parser.error("--tokens must be >= 2")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model, tok = load(args.model)
    _check(parser, args, model)
    if args.command in ("peak-worker", "context-worker"):
        result = (peak_run if args.command == "peak-worker" else context_run)(args, model, tok, args.config)
        print(json.dumps(result))
        return result
    begin = time.time()
    run = {"cascade": run_cascade, "chunked": run_chunked, "decode": run_decode, "context": run_context}
    body, table = run[args.command](args, model, tok)
    meta = metadata(argv, args, model)
    meta["seconds"] = round(time.time() - begin, 1)
    result = {"meta": meta, args.command: body}
    path = write(args, result, table)
    print(table)
    print(f"\nwrote {path} ({meta['seconds']} s)", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
