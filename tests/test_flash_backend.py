"""The flash backend: decoded tokens through torch's varlen flash attention, each segment one packed sequence.

Flash has no CPU kernel, so on the CPU ``varlen_attn`` is replaced by a plain-torch model of its documented
contract (packed sequences from ``cu_seq_q``/``cu_seq_k``, ``seqused_k`` rows used, GQA, ``scale``): what is checked
here is adakv's packing (offsets, slack skipped, groups, empty segments) against the ragged reference. On a GPU
(``ADAKV_TEST_DEVICE=cuda``, benchmarks/gpu_suite.sh) the same test runs the real kernel.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import DEVICE

from adakv.kernels import flash_attention, reference

ON_CPU = DEVICE.type != "cuda"


def varlen_model(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, enable_gqa=False, seqused_k=None):
    """torch.nn.attention.varlen.varlen_attn's contract (non-causal), in plain torch, fp32 softmax."""
    assert cu_seq_q.dtype == cu_seq_k.dtype == seqused_k.dtype == torch.int32
    assert enable_gqa or query.shape[1] == key.shape[1]
    group = query.shape[1] // key.shape[1]
    out = torch.full_like(query, float("nan"))  # poisoned: rows a sequence does not own stay NaN
    for i in range(cu_seq_q.numel() - 1):
        q0, q1 = int(cu_seq_q[i]), int(cu_seq_q[i + 1])
        k0 = int(cu_seq_k[i])
        used = int(seqused_k[i]) if seqused_k is not None else int(cu_seq_k[i + 1]) - k0
        assert q1 - q0 <= max_q and used <= max_k and k0 + used <= int(cu_seq_k[i + 1])
        if used == 0:  # nothing to attend: left NaN (flash's output there is not the reference's zeros)
            continue
        k = key[k0 : k0 + used].float().repeat_interleave(group, 1)  # [used, Hq, D]
        v = value[k0 : k0 + used].float().repeat_interleave(group, 1)
        logits = torch.einsum("qhd,khd->hqk", query[q0:q1].float(), k) * scale
        out[q0:q1] = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v).to(query.dtype)
    return out


def skip_unless_flash_runs() -> None:
    """On a GPU whose torch lacks what the backend needs, there is nothing to run (the CPU run checks the packing)."""
    why = None if ON_CPU else flash_attention.unavailable(DEVICE)
    if why is not None:
        pytest.skip(f"the flash backend cannot run on this GPU: {why}")


@pytest.fixture
def flash(monkeypatch):
    if ON_CPU:
        monkeypatch.setattr(flash_attention, "_varlen", lambda: varlen_model)
    skip_unless_flash_runs()
    return flash_attention


def ragged(bsz, heads, dim, lengths, slack, dtype, seed):
    """Segments of the given lengths with ``slack`` NaN rows after each (what seqused_k must skip)."""
    gen = torch.Generator().manual_seed(seed)
    length = torch.tensor(lengths, dtype=torch.int64).reshape(bsz, heads)
    capacity = length + slack
    start = torch.cumsum(capacity.reshape(-1), 0).reshape(bsz, heads) - capacity
    rows = int(capacity.sum())
    k_buf = torch.full((rows, dim), float("nan"))
    v_buf = torch.full((rows, dim), float("nan"))
    for s, n in zip(start.reshape(-1).tolist(), length.reshape(-1).tolist()):
        k_buf[s : s + n] = torch.randn(n, dim, generator=gen)
        v_buf[s : s + n] = torch.randn(n, dim, generator=gen)
    to = dict(device=DEVICE)
    return k_buf.to(dtype=dtype, **to), v_buf.to(dtype=dtype, **to), start.to(**to), length.to(**to)


@pytest.mark.fast
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
def test_flash_decode_matches_the_reference(flash, dtype, group):
    bsz, heads, dim = 2, 3, 64
    lengths = [5, 130, 0, 1, 64, 17]  # uneven, an empty segment, a single token
    k_buf, v_buf, start, length = ragged(bsz, heads, dim, lengths, slack=7, dtype=dtype, seed=group)
    q = torch.randn(bsz, heads, group, 1, dim, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    scaling = dim**-0.5
    assert flash.takes(q, None, None)
    out = flash.decode_attention(q, k_buf, v_buf, start, length, scaling, max_len=140)  # a width past the longest
    expected = reference.ragged_attention(q, k_buf, v_buf, start, length, scaling)
    assert out.shape == q.shape and out.dtype == dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(out[0, 2], torch.zeros_like(out[0, 2]))  # the empty segment: zeros


@pytest.mark.fast
def test_flash_takes_only_what_it_computes_exactly(flash):
    q = torch.zeros(1, 1, 1, 1, 64, dtype=torch.bfloat16)
    assert flash.takes(q, None, None)
    assert not flash.takes(q, 30.0, None)  # softcap: Triton
    assert not flash.takes(q.float(), None, None)  # fp32: Triton
    assert not flash.takes(torch.zeros(1, 1, 1, 2, 64, dtype=torch.bfloat16), None, None)  # a multi-token append
    assert not flash.takes(q, None, torch.zeros(1, 1, dtype=torch.int64))  # padded appends
    assert not flash.takes(torch.zeros(1, 1, 1, 1, 60, dtype=torch.bfloat16), None, None)  # head_dim % 8 != 0


@pytest.mark.fast
def test_flash_says_why_it_cannot_run():
    assert "needs CUDA tensors" in flash_attention.unavailable(torch.device("cpu"))


@pytest.mark.skipif(ON_CPU, reason="flash attention runs on CUDA only (benchmarks/gpu_suite.sh runs this there)")
def test_flash_backend_generates_as_the_triton_backend():
    from tiny_models import padded_batch, tiny_model

    from adakv import AdaKVCache, with_cache

    skip_unless_flash_runs()
    model = tiny_model("llama").to(torch.bfloat16)
    ids, mask = padded_batch(seq_len=80, pad=9)
    logits = []
    for backend in ("triton", "flash"):
        cache = AdaKVCache(model, 0.4, window=4, backend=backend)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                **with_cache(cache),
                max_new_tokens=24,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        logits.append(torch.stack(out.logits, 1).float())
    torch.testing.assert_close(logits[1], logits[0], rtol=5e-2, atol=5e-2)
