"""Ragged decode attention on PyTorch's flash-attention varlen entry point (the ``flash`` backend).

``torch.nn.attention.varlen.varlen_attn`` attends a batch of packed sequences of different lengths. The compacted
storage is already such a pack: segment (b, h) is one "sequence" of one KV head whose rows start at
``start[b, h]``, followed by its slack, then the next segment. So a decoded token needs no copy at all:

* queries: the G heads of a KV group for one token, ``[B*H, G, D]``, one query token per sequence
  (``cu_seq_q = 0, 1, ..., B*H``);
* keys/values: the storage buffers viewed as ``[rows, 1, D]``; ``cu_seq_k`` = the segments' starts (their
  capacities, slack included, summed), and ``seqused_k`` = their lengths, so the slack is never read;
* ``enable_gqa=True``: the G query heads share the segment's one KV head.

Only what flash computes exactly as :func:`adakv.kernels.reference.ragged_attention` does goes there: one query
token per segment (decoding), no logit softcap, fp16/bf16, head_dim a multiple of 8 up to 256. Everything else
(prompt chunks, multi-token appends with their causal ``hidden`` offsets, softcap models, fp32) takes the Triton
kernel, as the ``triton`` backend does. A segment with no token gives zeros (the reference's convention),
whatever flash returns. Flash runs on CUDA only; :func:`unavailable` says why it cannot be used before a cache picks it.
"""

from __future__ import annotations

import inspect

import torch

HALF = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _varlen():
    from torch.nn.attention import varlen  # torch >= 2.10; checked by unavailable()

    return varlen.varlen_attn


def unavailable(device: torch.device) -> str | None:
    """Why the flash backend cannot run on ``device`` (None: it can)."""
    if device.type != "cuda":
        return f"it needs CUDA tensors (flash attention has no {device.type} kernel)"
    if torch.version.hip is None and torch.cuda.get_device_capability(device) < (8, 0):
        name = torch.cuda.get_device_name(device)
        return f"torch's flash attention needs an Ampere or newer GPU, and {name} is older"
    try:
        fn = _varlen()
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10 has it)"
    missing = [name for name in ("seqused_k", "enable_gqa") if name not in inspect.signature(fn).parameters]
    if missing:  # torch 2.11's varlen_attn has neither (seen on the H100 machine, 2026-11-25)
        return (
            f"torch {torch.__version__}'s varlen_attn takes no {' or '.join(missing)} (seqused_k skips each "
            "segment's slack, enable_gqa serves a query group from one K/V head)"
        )
    return None


def takes(q: torch.Tensor, softcap: float | None, hidden: torch.Tensor | None) -> bool:
    """Whether flash computes this call exactly (else the Triton kernel does)."""
    q_len, dim = q.shape[-2], q.shape[-1]
    shape_ok = dim <= MAX_HEAD_DIM and dim % 8 == 0  # flash's head sizes
    return q_len == 1 and softcap is None and hidden is None and q.dtype in HALF and shape_ok


def decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    scaling: float,
    max_len: int,
) -> torch.Tensor:
    """One query token per segment (:func:`takes`): ``q`` ``[B, H, G, 1, D]`` over the ragged segments, returns
    ``[B, H, G, 1, D]``. ``max_len``: at least the longest segment (a fixed width keeps the call's shapes fixed)."""
    bsz, heads, group, _, dim = q.shape
    n_seg = bsz * heads
    if n_seg == 0 or max_len == 0:
        return torch.zeros_like(q)
    # device ops only (no host-to-device copy), so a CUDA graph can capture the call
    rows = start.new_full((1,), k_buf.shape[0])
    cu_seq_k = torch.cat([start.reshape(-1), rows]).to(torch.int32)
    cu_seq_q = torch.arange(n_seg + 1, dtype=torch.int32, device=q.device)
    used = length.reshape(-1).to(torch.int32)
    out = _varlen()(
        q.reshape(n_seg, group, dim),
        k_buf.view(-1, 1, dim),
        v_buf.view(-1, 1, dim),
        cu_seq_q,
        cu_seq_k,
        1,
        max_len,
        scale=scaling,
        enable_gqa=True,
        seqused_k=used,
    )
    out = torch.where(used[:, None, None] > 0, out, 0.0)  # an empty segment: zeros, as the reference
    return out.to(q.dtype).reshape(bsz, heads, group, 1, dim)
