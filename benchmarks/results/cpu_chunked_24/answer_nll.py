"""Needle score and teacher-forced answer NLL over N samples (SmolLM2, budget 0.2, chunks of 512 or one shot).

Args: L N method json_cache_kwargs [oneshot|chunked] [hold]. Prints the score, one character per sample, the mean
NLL of the answer's tokens (" " + the 7 digits, from the prompt's last logits) and the mean over samples of the
worst token's NLL, then each sample's worst-token NLL. The cache the prefill left is copied: one copy decodes
greedily (the score), the other takes the answer teacher-forced (the NLL).
"""

import copy
import json
import sys

import torch

from adakv import AdaKVCache, with_cache
from adakv.eval.cli import load_model
from adakv.eval.runners import chunked_prefill
from adakv.eval.tasks import encode_sample, make_samples, score

torch.set_num_threads(1)
length, n, method = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
kwargs = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
mode = sys.argv[5] if len(sys.argv) > 5 else "chunked"
hold = len(sys.argv) > 6 and sys.argv[6] == "hold"
model, tok = load_model("smollm2", "float32", "cpu")
got, nll, worst = [], [], []
with torch.no_grad():
    for sample in make_samples("niah_single", tok, n, length, 0, "prose"):
        ids = encode_sample(tok, sample).full_ids
        cache = AdaKVCache(model, 0.2, method=method, **kwargs)
        if mode == "chunked":
            logits = chunked_prefill(512, hold_final=hold)(model, cache, ids)
        else:
            logits = model(ids, **with_cache(cache)).logits[:, -1]
        twin = copy.deepcopy(cache)
        token = logits.argmax(-1)
        out = [token]
        for _ in range(sample.max_new_tokens - 1):
            token = model(token.view(1, 1), **with_cache(cache), logits_to_keep=1).logits[:, -1].argmax(-1)
            out.append(token)
        got.append(score(sample, tok.decode(torch.cat(out), skip_special_tokens=True)))
        target = torch.tensor([tok.encode(" " + sample.answers[0])])
        logp = [torch.log_softmax(logits.float(), -1)[0, target[0, 0]]]
        more = model(target[:, :-1], **with_cache(twin)).logits.float().log_softmax(-1)[0]
        logp = torch.stack(logp + [more[i, target[0, i + 1]] for i in range(target.shape[1] - 1)])
        nll.append(float(-logp.mean()))
        worst.append(float(-logp.min()))
print(
    method,
    kwargs,
    mode,
    "hold" if hold else "",
    f"L {length} score {sum(got) / len(got):.3f}",
    "".join(str(int(g)) for g in got),
    f"nll {sum(nll) / len(nll):.3f} worst {sum(worst) / len(worst):.3f}",
    " ".join(f"{w:.2f}" for w in worst),
    flush=True,
)
