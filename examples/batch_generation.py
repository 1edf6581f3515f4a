"""Batch generation with left padding: each sequence gets its own budget, padding is never kept.

python examples/batch_generation.py
"""

import torch

from adakv import AdaKVCache, with_cache
from adakv.models import load_smollm2
from adakv.needle import make_needle_sample


def main(lengths: tuple[int, ...] = (600, 1200), budget: float = 0.3) -> list[str]:
    model, tokenizer = load_smollm2()
    prompts = [make_needle_sample(tokenizer, n, 0.5, seed=n, digits=4).full_prompt_ids()[0] for n in lengths]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    cache = AdaKVCache(model, budget=budget, method="defensivekv")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **with_cache(cache), max_new_tokens=10, do_sample=False)
    answers = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    for row, answer in enumerate(answers):
        kept = cache.kept_lengths(0)[row].tolist()
        print(f"sequence {row}: {len(prompts[row])} prompt tokens, layer-0 kept per KV head {kept}: {answer!r}")
    return answers


if __name__ == "__main__":
    main()
