"""Which (layer, KV head) carry the retrieval in full-cache multi-query answers: attention mass of the answer's
teacher-forced steps on the asked needle's 'KEY is VALUE' tokens, and whether kvzip+ at 0.2 held them there."""

import sys

import torch
from transformers import DynamicCache

from adakv import AdaKVCache, compress_context
from adakv.eval.cli import load_model
from adakv.eval.tasks import encode_sample, make_samples, questions

model, tok = load_model("smollm2", "float32", "cpu")
items = make_samples("niah_multiquery", tok, 16, 2000, seed=0)
sample_ids = [int(x) for x in sys.argv[1:]]
cfg = model.config
G = cfg.num_attention_heads // cfg.num_key_value_heads
for i in sample_ids:
    s = items[i]
    enc0 = encode_sample(tok, s)
    ctx = enc0.context_ids
    cache = AdaKVCache(model, 0.2, method="kvzip+", window=32)
    compress_context(model, cache, ctx, tokenizer=tok)
    model.set_attn_implementation("eager")
    held = [layer._positions(view=False)[0] for layer in cache.layers]  # [H, M]
    starts, text = [], ""
    for t in ctx[0].tolist():
        starts.append(len(text))
        text += tok.decode([t])
    spans = {}
    for key in s.meta["keys"]:
        value = s.meta["values"][key][0]
        at = text.index(f"for {key} is {value}")
        spans[key] = [j for j, st in enumerate(starts) if at <= st < at + len(f"for {key} is {value}")]
    for q in questions(s):
        qenc = encode_sample(tok, q)
        key = [k for k in s.meta["keys"] if s.meta["values"][k] == q.answers][0]
        ans = tok.encode(" " + q.answers[0], add_special_tokens=False)
        ids = torch.cat([qenc.full_ids, torch.tensor([ans[:-1]])], -1)
        with torch.no_grad():
            dc = DynamicCache(config=cfg)
            model(ids[:, : -len(ans)], past_key_values=dc)
            out = model(ids[:, -len(ans) :], past_key_values=dc, output_attentions=True)
        # mass per (layer, kv head) on the asked needle's tokens, summed over the answer steps and the group
        mass = torch.stack(
            [
                a[0].reshape(cfg.num_key_value_heads, G, len(ans), -1)[..., spans[key]].sum((1, 2, 3))
                for a in out.attentions
            ]
        )  # [L, H]
        top = mass.flatten().topk(6)
        desc = []
        for v, idx in zip(top.values.tolist(), top.indices.tolist()):
            l, h = divmod(idx, cfg.num_key_value_heads)
            kept = sum(int(p) in held[l][h].tolist() for p in spans[key])
            desc.append(f"L{l}h{h}:{v:.2f}({kept}/{len(spans[key])})")
        print(f"s{i} {key:>9} ", " ".join(desc), flush=True)
