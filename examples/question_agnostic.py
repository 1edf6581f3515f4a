"""Compress a document once, then ask it several questions (each from a copy of the compressed cache).

python examples/question_agnostic.py
"""

import copy

import torch

from adakv import AdaKVCache, kv_bytes, with_cache
from adakv.models import load_smollm2
from adakv.needle import make_needle_sample


def main(context_tokens: int = 800, budget: float = 0.5) -> list[str]:
    model, tokenizer = load_smollm2()
    sample = make_needle_sample(tokenizer, context_tokens, depth=0.5, seed=7, digits=3)
    document = sample.context_prompt_ids()
    cache = AdaKVCache(model, budget=budget)
    with torch.no_grad():
        model(document, **with_cache(cache))  # compressed here, before any question exists
    print(f"document: {document.shape[1]} tokens, K/V held: {kv_bytes(cache) / 2**20:.1f} MiB")
    answers = []
    for question in (sample.question_ids(), sample.question_ids()):
        asked = copy.deepcopy(cache)  # each question continues from the same compressed document
        full = torch.cat([document, question], -1)
        with torch.no_grad():
            out = model.generate(full, attention_mask=torch.ones_like(full), **with_cache(asked), max_new_tokens=8)
        answers.append(tokenizer.decode(out[0, full.shape[1] :], skip_special_tokens=True))
        print(f"answer: {answers[-1]!r} (expected {sample.answer})")
    return answers


if __name__ == "__main__":
    main()
