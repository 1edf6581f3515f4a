"""The one-line use: generate with a compressed cache that keeps 20% of the prompt.

python examples/one_liner.py
"""

import torch

from adakv import AdaKVCache, kv_bytes, with_cache
from adakv.models import load_smollm2
from adakv.needle import make_needle_sample


def main(context_tokens: int = 1500, budget: float = 0.2) -> str:
    model, tokenizer = load_smollm2()
    ids = make_needle_sample(tokenizer, context_tokens, depth=0.5, seed=1, digits=4).full_prompt_ids()
    cache = AdaKVCache(model, budget=budget)  # the one line
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **with_cache(cache), max_new_tokens=12)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"answer: {answer!r}\nK/V held: {kv_bytes(cache) / 2**20:.1f} MiB")
    print(cache.stats())
    return answer


if __name__ == "__main__":
    main()
