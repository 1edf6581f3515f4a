"""Speed and memory of the compressed cache on a GPU (random weights: speed does not depend on them).

    python benchmarks/gpu_speed.py                      # CUDA, Llama-3.1-8B shape, bf16
    python benchmarks/gpu_speed.py --device cpu --layers 2 --contexts 1024 --hidden 512 --heads 8 --kv-heads 2 \
        --dtype float32 --batches 1 --out gpu_speed_cpu_smoke     # a quick run of the script itself

Measures (medians over repeats, CUDA events on GPU):
1. decode attention: achieved bandwidth of the ragged kernel (kept K/V bytes / time) vs the
   device's measured copy bandwidth, and its time at budget 0.2 vs full-cache sdpa decode attention;
2. compaction time as a fraction of the prefill time of one layer;
3. end-to-end decode ms/token, AdaKVCache(0.2) vs DynamicCache, per context and batch, with
   the memory-bound floor (weight bytes + K/V bytes) / copy bandwidth, and peak memory.
Writes benchmarks/results/<out>.json with the command, device, versions and date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import adakv
from adakv import AdaKVCache, kv_bytes
from adakv.kernels import ops_for, reference
from adakv.storage import RaggedKV

RESULTS = Path(__file__).parent / "results"


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str, repeats: int) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = (1 << 28) if device == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / timed(lambda: dst.copy_(src), device, repeats)


def attention_point(args, ctx: int, batch: int, dtype, bandwidth: float) -> dict:
    """Decode attention alone: ragged kernel over a 0.2 budget vs sdpa over the full cache."""
    dev, h_kv, dim, group = args.device, args.kv_heads, args.hidden // args.heads, args.heads // args.kv_heads
    keep_n = int(ctx * args.budget)
    gen = torch.Generator(device=dev).manual_seed(0)
    # uneven head budgets like Ada-KV's: each head between 0.5x and 1.5x the mean, same total
    frac = torch.linspace(0.5, 1.5, h_kv, device=dev)
    lengths = (frac / frac.mean() * keep_n).long().clamp(1, ctx).expand(batch, h_kv).contiguous()
    keys = torch.randn(batch, h_kv, ctx, dim, device=dev, dtype=dtype, generator=gen)
    keep = torch.arange(ctx, device=dev)[None, None, :] >= (ctx - lengths)[..., None]
    store = RaggedKV.from_dense(keys, keys, keep)
    q = torch.randn(batch, h_kv, group, 1, dim, device=dev, dtype=dtype, generator=gen)
    ops = ops_for(q)
    attend = lambda: ops.ragged_attention(  # noqa: E731
        q, store.keys, store.values, store.start, store.length, dim**-0.5, None, None, store.max_length()
    )
    t_ragged = timed(attend, dev, args.repeats)
    # correctness at this size (long segments exercise the split-K merge): fp32 torch reference
    ref = reference.ragged_attention(q, store.keys, store.values, store.start, store.length, dim**-0.5)
    err = float((attend().float() - ref.float()).abs().max() / ref.float().abs().max())
    del ref
    kept_bytes = 2 * int(store.lengths().sum()) * dim * keys.element_size()
    q_full = q.reshape(batch, h_kv * group, 1, dim)
    full = lambda: F.scaled_dot_product_attention(q_full, keys, keys, enable_gqa=True)  # noqa: E731
    t_full = timed(full, dev, args.repeats)
    prefill_q = torch.randn(batch, h_kv * group, ctx, dim, device=dev, dtype=dtype, generator=gen)
    prefill = lambda: F.scaled_dot_product_attention(prefill_q, keys, keys, is_causal=True, enable_gqa=True)  # noqa: E731
    t_prefill = timed(prefill, dev, max(1, args.repeats // 4))
    compact = lambda: RaggedKV.from_dense(keys, keys, keep)  # noqa: E731
    t_compact = timed(compact, dev, args.repeats)
    return {
        "context": ctx,
        "batch": batch,
        "backend": ops.name,
        "ragged_decode_attention_s": t_ragged,
        "full_sdpa_decode_attention_s": t_full,
        "ratio_vs_full": t_ragged / t_full,
        "max_rel_err_vs_reference": err,
        "achieved_bandwidth_GBps": kept_bytes / t_ragged / 1e9,
        "fraction_of_copy_bandwidth": kept_bytes / t_ragged / bandwidth,
        "compaction_s": t_compact,
        "prefill_attention_s": t_prefill,
        "compaction_fraction_of_prefill_attention": t_compact / t_prefill,
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
            cache = make()
            with torch.no_grad():
                if dev == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = model(ids, past_key_values=cache, logits_to_keep=1)  # full logits would dwarf the KV
                tok = out.logits[:, -1:].argmax(-1)
                t_prefill = time.perf_counter() - t0  # argmax reads the logits: the prefill has finished
                del out
                peak_prefill = torch.cuda.max_memory_allocated() if dev == "cuda" else None

                def step(cache=cache, tok=tok):
                    return model(tok, past_key_values=cache)

                t = timed(step, dev, args.decode_steps)
        except torch.OutOfMemoryError:
            row[name] = "out of memory"
            continue
        kv = kv_bytes(cache)
        row[name] = {
            "prefill_s": t_prefill,
            "peak_memory_prefill_bytes": peak_prefill,
            "decode_ms_per_token": t * 1e3,
            "kv_bytes": kv,
            "floor_ms": (weight_bytes + kv) / bandwidth * 1e3,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
        }
        del cache
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--decode-steps", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=262144, help="skip end-to-end points with batch*context above")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--out", default="gpu_speed")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; pass --device cpu for a smoke run of the script")
    dtype = getattr(torch, args.dtype)
    bandwidth = copy_bandwidth(args.device, args.repeats)
    attention = [attention_point(args, ctx, b, dtype, bandwidth) for ctx in args.contexts for b in args.batches]
    e2e = []
    if not args.skip_e2e:
        config = LlamaConfig(
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            vocab_size=args.vocab,
            max_position_embeddings=max(args.contexts) + 64,
        )
        with torch.device(args.device):
            model = LlamaForCausalLM(config).to(dtype).eval()
        e2e = [
            e2e_point(args, model, ctx, b, bandwidth)
            for ctx in args.contexts
            for b in args.batches
            if ctx * b <= args.max_tokens
        ]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "versions": {"adakv": adakv.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "attention": attention,
        "end_to_end": e2e,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
