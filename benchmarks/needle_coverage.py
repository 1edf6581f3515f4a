"""Which KV heads still hold a needle's tokens after the prompt: one shot vs chunked vs chunked with hold_final.

    python benchmarks/needle_coverage.py --samples 0 4 [--method defensivekv] [--length 4000] [--chunk 512]
        [--budget 0.2] [--without floor|value] [--floor-mean held|seen]

For each niah_single sample (the harness's, seed 0, question-aware prompt) and each way of filling the cache,
prints how many (layer, KV head) segments hold each token of the needle's value, and how many layers lost a
token in every head. ``--without floor`` / ``--without value`` score with DefensiveKV minus its prior
correction / minus its value term (diagnostics: which step loses the needle). Prints only, saves nothing."""

from __future__ import annotations

import argparse

import torch

from adakv import AdaKVCache, prefill_in_chunks, with_cache
from adakv.eval.cli import load_model
from adakv.eval.tasks import encode_sample, make_samples
from adakv.layer import AdaKVLayer
from adakv.methods import get_method
from adakv.scorers import DefensiveKV
from adakv.scorers.base import window_attention
from adakv.scorers.defensivekv import defensive_aggregation, head_share_of_value


class DefensiveWithout(DefensiveKV):
    """DefensiveKV with one step left out: ``"floor"`` (the prior correction) or ``"value"`` (the value term)."""

    def __init__(self, without: str | None, floor_mean: str = "held"):
        super().__init__(floor_mean=floor_mean)
        self.without = without

    def __call__(self, inputs):
        if self.without is None:
            return super().__call__(inputs)
        attn = window_attention(inputs)
        if self.without == "floor":  # no real token to average over: the floor is 0, the risk stays as it is
            risk = defensive_aggregation(attn, torch.zeros_like(inputs.valid), self.kernel_size, inputs.positions)
            return risk * head_share_of_value(inputs)
        return defensive_aggregation(attn, inputs.valid, self.kernel_size, inputs.positions, self.floor_mean == "seen")


def needle_tokens(tok, ids: torch.Tensor, answer: str) -> list[int]:
    starts, text = [], ""
    for t in ids[0].tolist():
        starts.append(len(text))
        text += tok.decode([t])
    at = text.index(answer)
    return [j for j, s in enumerate(starts) if at <= s < at + len(answer)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--samples", type=int, nargs="+", default=[0])
    p.add_argument("--length", type=int, default=4000)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--method", default="defensivekv")
    p.add_argument("--without", choices=["floor", "value"], default=None, help="DefensiveKV minus one step")
    p.add_argument("--floor-mean", choices=["held", "seen"], default="held", help="DefensiveKV's floor_mean")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.without == "floor" and args.floor_mean != "held":
        p.error("--floor-mean chooses the floor's mean; with --without floor there is no floor")
    variant = args.without is not None or args.floor_mean != "held"
    if variant and not isinstance(get_method(args.method)[0], DefensiveKV):
        p.error(f"--without / --floor-mean change DefensiveKV's scoring; --method {args.method} does not use it")
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, "float32", "cpu")
    samples = make_samples("niah_single", tok, max(args.samples) + 1, args.length, 0, "prose")
    for i in args.samples:
        ids = encode_sample(tok, samples[i]).full_ids
        answer = samples[i].answers[0]
        needle = needle_tokens(tok, ids, answer)
        for mode in ("one shot", "chunked", "chunked, hold_final"):
            if variant:
                allocator = get_method(args.method)[1]
                scorer = DefensiveWithout(args.without, args.floor_mean)
                cache = AdaKVCache(model, args.budget, scorer=scorer, allocator=allocator)
            else:
                cache = AdaKVCache(model, budget=args.budget, method=args.method)
            with torch.no_grad():
                if mode == "one shot":
                    model(ids, **with_cache(cache), use_cache=True, logits_to_keep=1)
                else:
                    prefill_in_chunks(model, cache, ids, args.chunk, hold_final=mode.endswith("hold_final"))
            held, segments = [], 0
            for layer in cache.layers:
                if not isinstance(layer, AdaKVLayer):
                    continue  # a stock (sliding-window) layer
                pos = layer._positions(view=False)[0]  # [H, M]
                segments += pos.shape[0]
                held.append([int((pos == q).any(-1).sum()) for q in needle])
            per_token = [sum(row[d] for row in held) for d in range(len(needle))]
            lost = sum(any(x == 0 for x in row) for row in held)
            print(
                f"sample {i} ({answer}) {mode}: segments holding each needle token (of {segments}) {per_token}; "
                f"layers where some token is in no head: {lost} of {len(held)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
