"""Speed of CritiPrefill's sparse prefill against dense attention (sdpa), measured in the same run.

    python benchmarks/critiprefill_speed.py                  # CUDA: Llama-3.1-8B shape, bf16, random weights, 32k/128k
    python benchmarks/critiprefill_speed.py --smoke          # a tiny CPU run of the same code (seconds)
    python benchmarks/critiprefill_speed.py --cpu-report     # CPU: SmolLM2-135M prefill at 4k and 8k, torch path
    python benchmarks/critiprefill_speed.py --quality        # CPU: SmolLM2 greedy answers, CritiPrefill vs full

GPU mode, per context (batch 1, no padding):
1. attention alone, one layer's shapes (random q/k/v; the block selection's cost does not depend on the values):
   sdpa causal (flash) vs CritiPrefill's whole call (selection + Triton kernel), the kernel alone on a fixed
   selection, the selection alone, and the kernel in dense mode (every segment dense) against sdpa. FLOP/s are
   reported on the (query, key) pairs each computes: all causal pairs for dense, the selected blocks plus each
   segment's causal diagonal for CritiPrefill (``4 * head_dim`` FLOPs per pair and query head).
2. end to end: the model's prefill (``logits_to_keep=1``, a DynamicCache) with its sdpa attention, then inside
   ``sparse_prefill(model)`` (layer 0 stays sdpa, as in the paper).
Kernels are timed as ``--calls`` calls back to back between two CUDA events (median over ``--repeats`` blocks);
prefills as ``--e2e-calls`` back to back between events, dense and CritiPrefill alternated in ``--e2e-repeats``
rounds (medians; each configuration's peak memory is the largest of its rounds).

CPU report: wall-clock of ``model(ids, past_key_values=DynamicCache(), logits_to_keep=1)`` for the stock sdpa
model and inside ``sparse_prefill`` (torch path), at the paper's defaults and at a smaller threshold
(``--cpu-threshold``) that makes more segments sparse: medians of ``--e2e-repeats`` rounds that interleave the
configurations, plus the process's CPU time, which a busy machine disturbs less than the wall-clock at one
thread. Random token ids (the time does not depend on them). ``--threads`` sets torch's thread count.

Quality check (``--quality``): SmolLM2 on ``adakv.eval`` tasks (``--tasks``, default niah_single) at
``--quality-tokens`` tokens (default 2048), ``--samples`` samples, question-aware (the whole prompt prefilled at
once): the greedy answer after a full prefill and after a CritiPrefill prefill (DynamicCache, then the same greedy
decoding), scored with :func:`adakv.eval.tasks.score`, and how many answers are identical. At 2k tokens the
paper's defaults are entirely dense, so the settings are scaled down (``--quality-settings``).

Writes benchmarks/results/critiprefill_<out>.json (or ``--out`` itself if it ends in .json) with the command,
machine, versions, date and parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LlamaConfig

from adakv import with_cache
from adakv.critiprefill import CritiPrefill, sparse_prefill
from adakv.eval.cli import add_llama_shape_args, llama_shape, random_llama
from adakv.eval.runinfo import run_info
from adakv.kernels import block_sparse_reference as reference

RESULTS = Path(__file__).parent / "results"


# -- timing --------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: str, repeats: int, calls: int, warmup: int = 1) -> float:
    """Median seconds per call over ``repeats`` blocks of ``calls`` back-to-back calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3 / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


# -- work accounting -------------------------------------------------------------------------------------------
def computed_pairs(blocks: torch.Tensor, dense: torch.Tensor, q_len: int, k_len: int, seg: int, blk: int) -> float:
    """(query, key) pairs a block-sparse call attends, summed over (batch, KV head) (no padding assumed)."""
    geo = reference.geometry(q_len, k_len, seg, blk)
    q_off = k_len - q_len + geo.pad
    blocks, dense = blocks.cpu().long(), dense.cpu()
    real_in_block = (torch.arange(geo.n_blk) * blk + blk - geo.pad).clamp(0, blk)  # real keys of each block
    real_in_block = torch.cat([real_in_block, torch.zeros(1, dtype=torch.long)])  # slot -1 -> 0 keys
    chosen = real_in_block[torch.where(blocks >= 0, blocks, geo.n_blk)].sum(-1).double()  # [B, H, n_seg]
    total = 0.0
    for s in range(geo.q_seg0, geo.n_seg):
        v0 = s * seg
        first = max(v0, q_off)
        n_q = v0 + seg - first
        before = torch.where(dense[:, :, s], float(max(v0 - geo.pad, 0)), chosen[:, :, s])
        own_start = max(v0, geo.pad)
        own = sum(v - own_start + 1 for v in range(first, v0 + seg))  # causal pairs inside the segment
        total += float((before * n_q + own).sum())
    return total


def dense_pairs(bsz: int, h_kv: int, q_len: int, k_len: int) -> float:
    off = k_len - q_len
    return float(bsz * h_kv * sum(off + i + 1 for i in range(q_len)))


class _Layer(nn.Module):
    """Stands in for an attention module: what CritiPrefill reads from one (``layer_idx``, its config)."""

    def __init__(self, layer_idx: int, num_layers: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.config = LlamaConfig(num_hidden_layers=num_layers)


# -- GPU (or smoke) points ---------------------------------------------------------------------------------------
def attention_point(args, policy: CritiPrefill, ctx: int, dtype: torch.dtype) -> dict:
    dev, h_q, h_kv = args.device, args.heads, args.kv_heads
    dim = args.hidden // args.heads
    gen = torch.Generator(device=dev).manual_seed(ctx)
    q = torch.randn(1, h_q, ctx, dim, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(1, h_kv, ctx, dim, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(1, h_kv, ctx, dim, device=dev, dtype=dtype, generator=gen)
    valid = torch.ones(1, ctx, dtype=torch.bool, device=dev)
    scaling = dim**-0.5
    layer = _Layer(policy.layer_skip, args.layers)
    kernel = policy.kernel(q)
    seg, blk = policy.segment_size, policy.block_size
    blocks, dense = policy.select(q, k, valid, layer.layer_idx)
    all_dense = reference.dense_selection(1, h_kv, ctx, ctx, seg, blk, dev)
    row: dict = {"context": ctx, "sparse": policy.sparse_possible(ctx, ctx)}
    sparse_pairs = computed_pairs(blocks, dense, ctx, ctx, seg, blk)
    full_pairs = dense_pairs(1, h_kv, ctx, ctx)
    flop = 4.0 * dim * (h_q // h_kv)
    calls, repeats = args.calls, args.repeats
    row["dense_sdpa_s"] = timed(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True),
        dev,
        repeats,
        calls,
    )
    row["critiprefill_s"] = timed(
        lambda: policy.attention(layer, q, k, v, valid, scaling, None), dev, repeats, calls
    )  # selection + kernel, the call the model makes
    row["selection_s"] = timed(lambda: policy.select(q, k, valid, layer.layer_idx), dev, repeats, calls)
    row["kernel_s"] = timed(lambda: kernel(q, k, v, blocks, dense, valid, scaling, None, seg, blk), dev, repeats, calls)
    row["kernel_dense_mode_s"] = timed(
        lambda: kernel(q, k, v, *all_dense, valid, scaling, None, seg, blk), dev, repeats, calls
    )
    row["pairs_fraction"] = sparse_pairs / full_pairs
    row["speedup_attention"] = row["dense_sdpa_s"] / row["critiprefill_s"]
    row["tflops_dense_sdpa"] = flop * full_pairs / row["dense_sdpa_s"] / 1e12
    row["tflops_kernel_dense_mode"] = flop * full_pairs / row["kernel_dense_mode_s"] / 1e12
    row["tflops_kernel_sparse_blocks"] = flop * sparse_pairs / row["kernel_s"] / 1e12
    policy.reset()
    return row


def e2e_point(args, model, policy: CritiPrefill, ctx: int) -> dict:
    dev = args.device
    ids = torch.randint(0, model.config.vocab_size, (1, ctx), device=dev, generator=torch.Generator(dev).manual_seed(0))

    def prefill():
        with torch.no_grad():
            return model(ids, **with_cache(DynamicCache(config=model.config)), logits_to_keep=1).logits

    row: dict = {"context": ctx}
    times: dict[str, list[float]] = {"dense_sdpa": [], "critiprefill": []}
    sel = None
    try:  # alternated rounds (dense, then sparse), each with its own peak (weights included), medians over rounds
        for rnd in range(args.e2e_repeats):
            for name in times:
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                with sparse_prefill(model, policy) if name == "critiprefill" else contextlib.nullcontext():
                    times[name].append(timed(prefill, dev, 1, args.e2e_calls, warmup=1 if rnd == 0 else 0))
                    if name == "critiprefill":
                        sel = policy.last_selection
                if dev == "cuda":
                    peak = torch.cuda.max_memory_allocated()
                    row[f"{name}_peak_bytes"] = max(peak, row.get(f"{name}_peak_bytes", 0))
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    for name, values in times.items():  # (after an out-of-memory error: what was measured before it)
        if values:
            row[f"{name}_s"] = statistics.median(values)
    if "error" in row:
        return row
    row["speedup"] = row["dense_sdpa_s"] / row["critiprefill_s"]
    if sel is not None:
        h_kv = model.config.num_key_value_heads
        row["pairs_fraction_last_layer"] = computed_pairs(
            *sel, ctx, ctx, policy.segment_size, policy.block_size
        ) / dense_pairs(1, h_kv, ctx, ctx)
    return row


def gpu_main(args) -> dict:
    dtype = getattr(torch, args.dtype)
    policy = CritiPrefill(**_policy_params(args), backend=args.backend, num_layers=args.layers)
    attention = [attention_point(args, policy, ctx, dtype) for ctx in args.contexts]
    e2e = []
    if not args.skip_e2e:
        model = random_llama(args.device, dtype, max(args.contexts) + 64, **llama_shape(args))
        for ctx in args.contexts:
            if args.device == "cuda":
                torch.cuda.empty_cache()
            e2e.append(e2e_point(args, model, policy, ctx))
    return {"policy": repr(policy), "dtype": args.dtype, "attention": attention, "end_to_end": e2e}


# -- CPU report on SmolLM2 ------------------------------------------------------------------------------------------
def cpu_report(args) -> dict:
    from adakv.models import load_model

    model, _ = load_model("smollm2")
    model.set_attn_implementation("sdpa")
    h_kv = model.config.num_key_value_heads
    rows = []
    given = "paper defaults" if _policy_params(args) == _policy_params(argparse.Namespace(**DEFAULTS)) else "given"
    settings = {
        given: CritiPrefill(**_policy_params(args), backend="torch"),
        f"threshold_len={args.cpu_threshold}": CritiPrefill(
            **{**_policy_params(args), "threshold_len": args.cpu_threshold}, backend="torch"
        ),
    }
    for ctx in args.contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(ctx))

        def prefill() -> tuple[float, float]:
            """(wall-clock, CPU time of this process) of one prefill, in seconds."""
            with torch.no_grad():
                t0, c0 = time.perf_counter(), time.process_time()
                model(ids, **with_cache(DynamicCache(config=model.config)), logits_to_keep=1)
                return time.perf_counter() - t0, time.process_time() - c0

        # rounds interleave the configurations, so a busy neighbour slows all of them alike
        times: dict[str, list[float]] = {"dense_sdpa": [], **{name: [] for name in settings}}
        cpu: dict[str, list[float]] = {name: [] for name in times}
        fractions: dict[str, float | None] = {}
        for _ in range(args.e2e_repeats):
            wall, used = prefill()
            times["dense_sdpa"].append(wall)
            cpu["dense_sdpa"].append(used)
            for name, policy in settings.items():
                policy.last_selection = None
                with sparse_prefill(model, policy):
                    wall, used = prefill()
                times[name].append(wall)
                cpu[name].append(used)
                sel = policy.last_selection
                fractions[name] = (
                    None
                    if sel is None
                    else computed_pairs(*sel, ctx, ctx, policy.segment_size, policy.block_size)
                    / dense_pairs(1, h_kv, ctx, ctx)
                )
        dense_s, dense_cpu = statistics.median(times["dense_sdpa"]), statistics.median(cpu["dense_sdpa"])
        row: dict = {
            "context": ctx,
            "dense_sdpa_s": dense_s,
            "dense_sdpa_cpu_s": dense_cpu,
            "dense_sdpa_all_s": times["dense_sdpa"],
            "dense_sdpa_all_cpu_s": cpu["dense_sdpa"],
        }
        for name, policy in settings.items():
            t, c = statistics.median(times[name]), statistics.median(cpu[name])
            row[name] = {
                "policy": repr(policy),
                "critiprefill_s": t,
                "critiprefill_cpu_s": c,
                "critiprefill_all_s": times[name],
                "critiprefill_all_cpu_s": cpu[name],
                "speedup": dense_s / t,
                "speedup_cpu_time": dense_cpu / c,
                "sparse": policy.sparse_possible(ctx, ctx),
                "pairs_fraction_sparse_layers": fractions[name],
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"model": "SmolLM2-135M-Instruct (fp32, sdpa)", "end_to_end": rows}


# -- quality check on SmolLM2 -----------------------------------------------------------------------------------------
QUALITY_SETTINGS = {
    "S256/B32/budgets512/thr512": dict(segment_size=256, block_size=32, budgets=512, threshold_len=512),
    "S128/B16/budgets256/thr256": dict(segment_size=128, block_size=16, budgets=256, threshold_len=256),
}


def quality(args) -> dict:
    from adakv.eval.tasks import encode_sample, make_samples, score
    from adakv.models import load_model

    model, tok = load_model("smollm2")
    model.set_attn_implementation("sdpa")
    eos = model.generation_config.eos_token_id

    def answer(ids: torch.Tensor, max_new: int) -> str:
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                **with_cache(DynamicCache(config=model.config)),
                do_sample=False,
                max_new_tokens=max_new,
                pad_token_id=eos if isinstance(eos, int) else eos[0],
            )
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    settings = {name: QUALITY_SETTINGS[name] for name in args.quality_settings}
    rows, outputs = [], []
    for task in args.tasks:
        samples = make_samples(task, tok, args.samples, args.quality_tokens, seed=0)
        per = {name: {"score": 0.0, "same_answer": 0} for name in ["full", *settings]}
        for i, sample in enumerate(samples):
            ids = encode_sample(tok, sample).full_ids
            texts = {"full": answer(ids, sample.max_new_tokens)}
            for name, params in settings.items():
                with sparse_prefill(model, CritiPrefill(**params, backend=args.backend)):
                    texts[name] = answer(ids, sample.max_new_tokens)
            for name, text in texts.items():
                per[name]["score"] += score(sample, text) / len(samples)
                per[name]["same_answer"] += int(text == texts["full"])
            outputs.append({"task": task, "sample": i, "tokens": ids.shape[1], "answers": sample.answers, **texts})
            print(json.dumps(outputs[-1]), flush=True)
        rows.append({"task": task, "tokens": args.quality_tokens, "samples": len(samples), **per})
    return {
        "model": "SmolLM2-135M-Instruct (fp32, sdpa)",
        "mode": "question-aware, greedy, DynamicCache",
        "settings": {name: repr(CritiPrefill(**p)) for name, p in settings.items()},
        "results": rows,
        "outputs": outputs,
    }


# -- main -------------------------------------------------------------------------------------------------------------
DEFAULTS = dict(segment_size=512, block_size=32, budgets=2048, threshold_len=4096, layer_skip=1)  # the paper's


def _policy_params(args) -> dict:
    return {
        "segment_size": args.segment_size,
        "block_size": args.block_size,
        "budgets": args.budgets,
        "threshold_len": args.threshold_len,
        "layer_skip": args.layer_skip,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the GPU benchmark's code (seconds)")
    p.add_argument("--cpu-report", action="store_true", help="SmolLM2 prefill on the CPU, torch path vs sdpa")
    p.add_argument("--quality", action="store_true", help="SmolLM2 greedy answers, CritiPrefill vs full prefill")
    p.add_argument("--tasks", nargs="+", default=["niah_single"], help="--quality: adakv.eval tasks")
    p.add_argument("--samples", type=int, default=8, help="--quality: samples per task")
    p.add_argument("--quality-tokens", type=int, default=2048, help="--quality: prompt length")
    p.add_argument("--quality-settings", nargs="+", default=list(QUALITY_SETTINGS), choices=list(QUALITY_SETTINGS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    add_llama_shape_args(p)
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="default 32768 131072 (CPU report: 4096 8192)")
    p.add_argument("--segment-size", type=int, default=DEFAULTS["segment_size"])
    p.add_argument("--block-size", type=int, default=DEFAULTS["block_size"])
    p.add_argument("--budgets", type=int, default=DEFAULTS["budgets"])
    p.add_argument("--threshold-len", type=int, default=DEFAULTS["threshold_len"])
    p.add_argument("--layer-skip", type=int, default=DEFAULTS["layer_skip"])
    p.add_argument("--cpu-threshold", type=int, default=1024, help="CPU report: the second, sparser setting")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per kernel (medians)")
    p.add_argument("--calls", type=int, default=10, help="back-to-back kernel calls per timed block")
    p.add_argument("--e2e-repeats", type=int, default=3)
    p.add_argument("--e2e-calls", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--out", default=None, help="a name (benchmarks/results/critiprefill_<name>.json) or a .json path")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.device, args.dtype, args.backend = "cpu", "float32", "torch"
        args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate, args.vocab = 2, 128, 4, 2, 256, 512
        args.contexts = args.contexts or [1024]
        args.segment_size, args.block_size, args.budgets, args.threshold_len = 64, 16, 128, 256
        args.repeats, args.calls, args.e2e_repeats, args.e2e_calls = 2, 2, 2, 1
        args.out = args.out or "smoke_cpu"
    elif args.quality:
        args.device = "cpu"
        args.out = args.out or "quality_smollm2"
    elif args.cpu_report:
        args.device = "cpu"
        args.contexts = args.contexts or [4096, 8192]
        args.out = args.out or "cpu_smollm2"
    else:
        args.contexts = args.contexts or [32768, 131072]
        args.out = args.out or "gpu"
        if args.device == "cuda" and not torch.cuda.is_available():
            p.error("no CUDA device; --smoke runs the same code on the CPU, --cpu-report the SmolLM2 report")
    if min(args.repeats, args.calls, args.e2e_repeats, args.e2e_calls) < 1:
        p.error("--repeats, --calls, --e2e-repeats and --e2e-calls must be positive")
    info = run_info("python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]), args.device)
    body = quality(args) if args.quality else cpu_report(args) if args.cpu_report else gpu_main(args)
    info["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = {
        **info,
        "timing": (
            f"kernels: {args.calls} back-to-back calls per timed block, median of {args.repeats}; prefill: "
            f"{args.e2e_calls} back-to-back per timed block, median of {args.e2e_repeats}"
            if not (args.cpu_report or args.quality)
            else f"prefill wall-clock and process CPU time, median of {args.e2e_repeats} rounds interleaving the "
            "configurations"
            if args.cpu_report
            else "no timing (quality check)"
        ),
        **body,
    }
    out = Path(args.out) if args.out.endswith(".json") else RESULTS / f"critiprefill_{args.out}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
