"""Why does kvzip+ at 0.2 miss multi-query needles the full cache answers? A dense simulation of the compressed
cache, to test two hypotheses before building anything:

1. *Which layers' eviction hurts*: the same kvzip+ selection applied only to some layers (the others keep the whole
   context).
2. *Lost attention mass*: each evicted token still contributes through a summary. Evicted tokens of a (layer, KV
   head) are grouped (all of them, or by runs of ``bin`` positions); a group of n tokens becomes one extra key/value
   pair with key = mean of the group's (rotated) keys, value = mean of its values, and a logit bias log(n), so that
   a query with equal scores over the group gives the group its whole mass (by Jensen, exp(q.mean k) * n <= sum
   exp(q.k_j): the summary under-estimates the group's mass when its scores vary).

The context is prefilled once with the full cache; kvzip+'s compression (one-shot, so the kept K/V equal the full
prefill's at those positions) gives the held positions per (layer, KV head); each question and its greedy answer then
run over a copy of the full cache with a custom attention that masks the evicted positions per head (exactly the
compressed cache's attention) and adds the variant's summaries.

    python merge_sim.py --samples 8 --variants none meanall bin64 [--budget 0.2 --alpha 0.2] --out merge_sim.jsonl
"""

import argparse
import copy
import dataclasses
import json
import math
import time

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from adakv import AdaKVCache, compress_context, with_cache
from adakv.allocators import LayerAdaptive
from adakv.eval.cli import load_model
from adakv.eval.runners import _answer  # the harness's own answer: generate, as `adakv-bench quality`
from adakv.eval.tasks import encode_sample, make_samples, questions, score
from adakv.scorers import KVzip

STATE: dict = {}


def summaries(k: torch.Tensor, v: torch.Tensor, held: torch.Tensor, ctx: int, bin_size: int | None):
    """Summary keys/values [H, S, D] and log-count biases [H, S] of the evicted context tokens of one layer
    (``k``, ``v``: [H, T, D] of the full cache, ``held``: [H, ctx] bool)."""
    groups = torch.zeros(ctx, dtype=torch.long) if bin_size is None else torch.arange(ctx) // bin_size
    G = int(groups.max()) + 1
    onehot = torch.nn.functional.one_hot(groups, G).T.float()  # [G, ctx]
    w = onehot[None] * (~held)[:, None, :].float()  # [H, G, ctx]
    n = w.sum(-1)  # [H, G]
    ks = w @ k[:, :ctx].float() / n.clamp(min=1)[..., None]
    vs = w @ v[:, :ctx].float() / n.clamp(min=1)[..., None]
    bias = torch.where(n > 0, n.clamp(min=1).log(), torch.full_like(n, -math.inf))
    return ks.to(k.dtype), vs.to(v.dtype), bias


def sim_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    l = module.layer_idx
    B, Hq, Q, D = query.shape
    H = key.shape[1]
    G = Hq // H
    ctx = STATE["ctx"]
    T = key.shape[2]
    bias = torch.zeros(H, T)
    variant = STATE["variant"]
    masked = variant["layers"](l)
    if masked:
        held = STATE["held"][l]  # [H, ctx] bool
        bias[:, :ctx] = torch.where(held, 0.0, -math.inf)
    k, v = key[0], value[0]
    if masked and variant["bin"] != "off" and variant["summ_layers"](l):
        if l not in STATE["summ"]:
            STATE["summ"][l] = summaries(k, v, STATE["held"][l], ctx, variant["bin"])
        ks, vs, sb = STATE["summ"][l]
        k = torch.cat([k, ks], 1)
        v = torch.cat([v, vs], 1)
        bias = torch.cat([bias, sb], 1)
    scores = torch.einsum("hgqd,htd->hgqt", query[0].reshape(H, G, Q, D), k) * scaling
    scores = scores + bias[:, None, None, :]
    if attention_mask is not None:
        m = attention_mask[0, 0, :, :T]  # [Q, T] additive
        scores[..., :T] = scores[..., :T] + m
    p = scores.softmax(-1)
    out = torch.einsum("hgqt,htd->hgqd", p, v).reshape(Hq, Q, D)
    return out.transpose(0, 1)[None].contiguous(), None


AttentionInterface.register("merge_sim", sim_attention)
AttentionMaskInterface.register("merge_sim", eager_mask)


def variant_spec(name: str, n_layers: int) -> dict:
    """none | meanall | binN (summaries), optionally suffixed @lo-hi: only layers lo..hi-1 compressed, and/or
    ~lo-hi: summaries only in layers lo..hi-1 (every compressed layer masks its evicted tokens)."""
    layers = lambda l: True  # noqa: E731
    summ_layers = lambda l: True  # noqa: E731
    if "~" in name:
        name, rng = name.split("~")
        lo, hi = (int(x) for x in rng.split("-"))
        summ_layers = lambda l, lo=lo, hi=hi: lo <= l < hi  # noqa: E731
    if "@" in name:
        name, rng = name.split("@")
        lo, hi = (int(x) for x in rng.split("-"))
        layers = lambda l, lo=lo, hi=hi: lo <= l < hi  # noqa: E731
    if name == "full":
        return {"layers": lambda l: False, "bin": "off", "summ_layers": summ_layers}
    if name == "none":
        return {"layers": layers, "bin": "off", "summ_layers": summ_layers}
    if name == "meanall":
        return {"layers": layers, "bin": None, "summ_layers": summ_layers}
    if name.startswith("bin"):
        return {"layers": layers, "bin": int(name[3:]), "summ_layers": summ_layers}
    raise ValueError(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--alpha", type=float, default=0.0, help="LayerAdaptive safeguard of kvzip+'s allocation")
    ap.add_argument("--variants", nargs="+", default=["none", "meanall", "bin64"])
    ap.add_argument("--plain", action="store_true", help="KVzip without kvzip+'s normalization")
    ap.add_argument("--value-only", action="store_true", help="kvzip+'s ||W_O v|| weight without the 1 / ||h||")
    ap.add_argument(
        "--layer-norm", action="store_true", help="each layer's scores divided by their mean before the global cut"
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.value_only and args.plain:
        ap.error("--value-only is kvzip+ without its hidden-state norm: not with --plain")
    torch.set_num_threads(1)
    model, tok = load_model("smollm2", "float32", "cpu")
    cfg = model.config
    items = make_samples("niah_multiquery", tok, args.first + args.samples, 2000, seed=0)[args.first :]
    specs = {n: variant_spec(n, cfg.num_hidden_layers) for n in args.variants}
    with open(args.out, "a") as f:
        for si, s in enumerate(items, start=args.first):
            t0 = time.time()
            enc = encode_sample(tok, s)
            ctx_ids = enc.context_ids
            scorer = KVzip(normalize=not args.plain)
            if args.value_only:  # a constant ||h|| (sqrt(D)): the ranking of a * ||W_O v|| alone
                observe = scorer.observe
                scorer.observe = lambda seen, scores: observe(
                    dataclasses.replace(seen, hidden_states=torch.ones_like(seen.hidden_states)), scores
                )
            if args.layer_norm:  # a layer's scores on a common scale: its mean over the held tokens (sinks stay inf)
                finalize = scorer.finalize

                def layer_normalized(scores, inputs, finalize=finalize):
                    valid = inputs.valid & (inputs.positions >= scorer.sinks)
                    mean = (scores * valid).sum((1, 2), keepdim=True) / valid.sum((1, 2), keepdim=True).clamp(min=1)
                    return finalize(scores / mean.clamp(min=1e-30), inputs)

                scorer.finalize = layer_normalized
            cache = AdaKVCache(
                model,
                args.budget,
                scorer=scorer,
                allocator=LayerAdaptive(args.alpha),
                window=32,
            )
            compress_context(model, cache, ctx_ids, tokenizer=tok)
            ctx = ctx_ids.shape[1]
            held = []
            for layer in cache.layers:
                pos = layer._positions(view=False)[0]  # [H, M]
                mask = torch.zeros(pos.shape[0], ctx, dtype=torch.bool)
                for h in range(pos.shape[0]):
                    p = pos[h][pos[h] >= 0]
                    mask[h, p] = True
                held.append(mask)
            del cache
            model.set_attn_implementation("sdpa")
            dense = DynamicCache(config=cfg)
            with torch.no_grad():
                model(ctx_ids, **with_cache(dense))
            model.set_attn_implementation("merge_sim")
            STATE.update(ctx=ctx, held=held)
            for qi, q in enumerate(questions(s)):
                qenc = encode_sample(tok, q)
                assert torch.equal(qenc.context_ids, ctx_ids)
                for name, spec in specs.items():
                    STATE.update(variant=spec, summ={})
                    text = _answer(model, tok, copy.deepcopy(dense), qenc.full_ids, None, q.max_new_tokens)
                    rec = {"sample": si, "question": qi, "variant": name, "score": score(q, text), "text": text}
                    rec.update(budget=args.budget, alpha=args.alpha, plain=args.plain, value_only=args.value_only)
                    if args.layer_norm:
                        rec["layer_norm"] = True
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
            model.set_attn_implementation("sdpa")
            print(f"sample {si} done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
