"""Fraction of the context each layer keeps (mean over its 3 KV heads, and its smallest head) under kvzip+ and
kvzip at 0.2 (one budget over all layers), on the first two multi-query samples: `python kept_per_layer.py`."""

import torch

from adakv import AdaKVCache, compress_context
from adakv.eval.cli import load_model
from adakv.eval.tasks import encode_sample, make_samples

torch.set_num_threads(2)
model, tok = load_model("smollm2", "float32", "cpu")
for method in ("kvzip+", "kvzip"):
    for i, s in enumerate(make_samples("niah_multiquery", tok, 2, 2000, seed=0)):
        ctx = encode_sample(tok, s).context_ids
        cache = AdaKVCache(model, 0.2, method=method, window=32)
        compress_context(model, cache, ctx, tokenizer=tok)
        frac = [(layer.store.lengths()[0].float() / ctx.shape[1]).tolist() for layer in cache.layers]
        print(f"{method} sample {i} ({ctx.shape[1]} tokens), layer:mean/min")
        print(" ".join(f"{l}:{sum(f) / len(f):.2f}/{min(f):.2f}" for l, f in enumerate(frac)), flush=True)
