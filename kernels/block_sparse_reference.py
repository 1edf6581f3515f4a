"""Block-sparse causal prefill attention in torch: the oracle and the CPU path of CritiPrefill.

Geometry (shared with :mod:`adakv.kernels.triton_block_sparse`). The query positions are the last ``L_q``
of the ``L_k`` key positions (causal, bottom-right aligned). Segments (of queries) and blocks (of keys) are
aligned to the END of the sequence, so that a left-padded sequence gets the same grid as when it runs alone:
``pad = (-L_k) % segment_size`` virtual positions are put in front of key 0, key ``k`` has virtual position
``k + pad``, segment ``s`` covers the virtual positions ``[s * segment_size, (s + 1) * segment_size)`` and block
``j`` covers ``[j * block_size, (j + 1) * block_size)``; ``segment_size`` is a multiple of ``block_size``.

Selection, per (batch, KV head, segment); the G query heads of a group share their KV head's selection:

- ``blocks``: int ``[B, H_kv, n_seg, K]``, block indices strictly before the segment's first position, without
  repeats; ``-1`` marks an empty slot.
- ``dense``: bool ``[B, H_kv, n_seg]``: the segment attends to every key before it (``blocks`` is then ignored).

Every query also attends, causally, to the keys of its own segment. Keys whose ``valid`` is False (left padding)
are never attended; a query that sees no key gets a zero output. The output is ``[B, L_q, H_q, D]`` (the layout
transformers' attention functions return) in the query's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

_alloc = torch.empty  # output allocation; tests swap in a NaN-filled one to catch unwritten elements


class Geometry(NamedTuple):
    pad: int  # virtual positions in front of key 0
    n_seg: int  # segments over the (virtual) key range
    n_blk: int  # blocks over the (virtual) key range
    q_seg0: int  # first segment that holds a query


def geometry(q_len: int, k_len: int, segment_size: int, block_size: int) -> Geometry:
    if segment_size % block_size:
        raise ValueError(f"segment_size ({segment_size}) must be a multiple of block_size ({block_size})")
    if not 0 < q_len <= k_len:
        raise ValueError(f"need 0 < q_len <= k_len, got q_len={q_len}, k_len={k_len}")
    pad = (-k_len) % segment_size
    total = k_len + pad
    return Geometry(pad, total // segment_size, total // block_size, (k_len - q_len + pad) // segment_size)


def check_inputs(q, k, v, blocks, dense, valid) -> tuple[int, int, int, int, int, int]:
    """Shapes of a block-sparse call, with a clear ValueError for what does not fit."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"need query [B, H_q, L_q, D] and key/value [B, H_kv, L_k, D]; got {q.shape}, {k.shape}")
    bsz, h_q, q_len, dim = q.shape
    h_kv, k_len = k.shape[1], k.shape[2]
    if k.shape[0] != bsz or k.shape[3] != dim or h_q % h_kv:
        raise ValueError(f"query {tuple(q.shape)} does not fit key {tuple(k.shape)} (H_q must be a multiple of H_kv)")
    if valid.shape != (bsz, k_len) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be bool [B, L_k] = [{bsz}, {k_len}], got {valid.dtype} {tuple(valid.shape)}")
    if dense.shape[:2] != (bsz, h_kv) or blocks.shape[:3] != dense.shape:
        raise ValueError(f"blocks {tuple(blocks.shape)} / dense {tuple(dense.shape)} must be [B, H_kv, n_seg(, K)]")
    return bsz, h_q, h_kv, q_len, k_len, dim


def selection_mask(
    blocks: torch.Tensor, dense: torch.Tensor, valid: torch.Tensor, q_len: int, segment_size: int, block_size: int
) -> torch.Tensor:
    """Bool ``[B, H_kv, L_q, L_k]``: which key each query attends to under a selection (the oracle's mask)."""
    bsz, h_kv, n_seg = dense.shape
    k_len = valid.shape[1]
    geo = geometry(q_len, k_len, segment_size, block_size)
    if n_seg != geo.n_seg:
        raise ValueError(f"selection has {n_seg} segments, the geometry {geo.n_seg}")
    dev = valid.device
    kv_pos = torch.arange(k_len, device=dev) + geo.pad  # virtual key positions
    q_pos = torch.arange(k_len - q_len, k_len, device=dev) + geo.pad
    q_seg = q_pos // segment_size
    # chosen[b, h, s, j]: block j selected for segment s
    chosen = torch.zeros(bsz, h_kv, n_seg, geo.n_blk + 1, dtype=torch.bool, device=dev)
    idx = torch.where(blocks >= 0, blocks.long(), geo.n_blk)
    chosen.scatter_(3, idx, True)
    chosen = chosen[..., : geo.n_blk]
    seg_start = torch.arange(n_seg, device=dev) * segment_size
    before = kv_pos[None, :] < seg_start[:, None]  # [n_seg, L_k]
    per_seg = (dense[..., None] & before) | chosen[..., kv_pos // block_size]  # [B, H_kv, n_seg, L_k]
    per_seg &= before  # selected blocks count only before the segment
    mask = per_seg[:, :, q_seg]  # [B, H_kv, L_q, L_k]
    own = (kv_pos[None, :] >= (q_seg * segment_size)[:, None]) & (kv_pos[None, :] <= q_pos[:, None])
    return (mask | own) & valid[:, None, None, :]


def _softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float, softcap: float | None = None
) -> torch.Tensor:
    """Dense attention under a bool mask ``[B, H_kv, L_q, L_k]`` (fp32, O(L_q L_k) memory): the oracle."""
    bsz, h_q, q_len, dim = q.shape
    h_kv = k.shape[1]
    qg = q.float().reshape(bsz, h_kv, h_q // h_kv, q_len, dim)
    logits = _softcapped(torch.einsum("bhgqd,bhkd->bhgqk", qg, k.float()) * scaling, softcap)
    logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num(0.0)  # a query that sees nothing gets 0
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, v.float())
    return out.reshape(bsz, h_q, q_len, dim).transpose(1, 2).to(q.dtype)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: torch.Tensor,
    dense: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    softcap: float | None,
    segment_size: int,
    block_size: int,
) -> torch.Tensor:
    """Causal block-sparse attention computing only the selected blocks (the torch path; see the module doc).

    One query segment at a time: the keys of its selected blocks are gathered (or, when some (batch, head)
    of the segment is dense, the whole prefix is taken under a mask), its own segment's keys are appended,
    and attention runs over those only: torch's fused sdpa with an additive mask (``enable_gqa``: no repeat of
    K/V), or, with a logit softcap, an explicit fp32 softmax.
    """
    bsz, h_q, h_kv, q_len, k_len, dim = check_inputs(q, k, v, blocks, dense, valid)
    group = h_q // h_kv
    geo = geometry(q_len, k_len, segment_size, block_size)
    if dense.shape[2] != geo.n_seg:
        raise ValueError(f"selection has {dense.shape[2]} segments, the geometry {geo.n_seg}")
    out = _alloc(bsz, q_len, h_q, dim, dtype=q.dtype, device=q.device)
    # fp32 on the CPU for half precision (its half matmuls are slow and less exact); the dtype itself elsewhere
    work = torch.float32 if q.device.type == "cpu" or q.dtype == torch.float32 else q.dtype
    q_off = k_len - q_len + geo.pad  # virtual position of query 0
    dev = q.device
    n_slots = blocks.shape[3]
    in_block = torch.arange(block_size, device=dev)
    any_dense = dense[:, :, geo.q_seg0 :].flatten(0, 1).any(0).tolist()  # one host read: the CPU path
    for s in range(geo.q_seg0, geo.n_seg):
        v0 = s * segment_size  # virtual start of the segment
        i0, i1 = max(v0, q_off) - q_off, v0 + segment_size - q_off  # its queries
        d0, d1 = max(v0 - geo.pad, 0), v0 + segment_size - geo.pad  # its own keys (real positions)
        # keys before the segment: the whole prefix under a mask, or only the gathered blocks
        if any_dense[s - geo.q_seg0]:
            pk, pv = k[:, :, :d0], v[:, :, :d0]
            pos = torch.arange(d0, device=dev)
            sel = torch.zeros(bsz, h_kv, geo.n_blk + 1, dtype=torch.bool, device=dev)
            sel.scatter_(2, torch.where(blocks[:, :, s] >= 0, blocks[:, :, s].long(), geo.n_blk), True)
            pmask = dense[:, :, s, None] | sel[:, :, (pos + geo.pad) // block_size]
            pmask = pmask & valid[:, None, :d0]
        else:
            slot = blocks[:, :, s].long()  # [B, H_kv, K]
            pos = (slot[..., None] * block_size + in_block - geo.pad).reshape(bsz, h_kv, n_slots * block_size)
            ok = (slot[..., None] >= 0).expand(-1, -1, -1, block_size).reshape(pos.shape) & (pos >= 0)
            pos = pos.clamp(0, k_len - 1)
            ok &= torch.gather(valid[:, None].expand(-1, h_kv, -1), 2, pos)
            index = pos[..., None].expand(-1, -1, -1, dim)
            pk, pv, pmask = torch.gather(k, 2, index), torch.gather(v, 2, index), ok
        own_pos = torch.arange(d0, d1, device=dev) + geo.pad
        q_pos = torch.arange(i0, i1, device=dev) + q_off
        causal = own_pos[None, :] <= q_pos[:, None]  # [m, n_own]
        own_mask = causal[None, None] & valid[:, None, None, d0:d1]  # [B, 1, m, n_own]
        m = i1 - i0
        keys = torch.cat([pk, k[:, :, d0:d1]], 2).to(work)
        values = torch.cat([pv, v[:, :, d0:d1]], 2).to(work)
        qs = q[:, :, i0:i1].to(work)
        if bool((pmask == pmask[:, :1]).all()):  # the usual case: one mask for every head
            pm = pmask[:, :1, None].expand(-1, -1, m, -1)
        else:
            pm = pmask.repeat_interleave(group, 1)[:, :, None].expand(-1, -1, m, -1)
        mask = torch.cat([pm, own_mask.expand(-1, pm.shape[1], -1, -1)], 3)  # [B, 1 or H_q, m, n]
        seen = mask.any(-1, keepdim=True)  # a row that sees no key gets 0
        if softcap is None:  # sdpa's fused CPU kernel, with an additive mask (much faster than a bool one)
            bias = torch.zeros(mask.shape, dtype=work, device=dev).masked_fill_(~mask, float("-inf"))
            res = F.scaled_dot_product_attention(qs, keys, values, attn_mask=bias, scale=scaling, enable_gqa=True)
        else:
            qg = qs.reshape(bsz, h_kv, group, m, dim)
            logits = _softcapped(torch.einsum("bhgqd,bhkd->bhgqk", qg, keys) * scaling, softcap)
            logits = logits.reshape(bsz, h_q, m, -1).masked_fill(~mask, float("-inf"))
            probs = torch.softmax(logits, -1).reshape(bsz, h_kv, group, m, -1)
            res = torch.einsum("bhgqk,bhkd->bhgqd", probs, values).reshape(bsz, h_q, m, dim)
        out[:, i0:i1] = torch.where(seen, res, 0.0).transpose(1, 2).to(q.dtype)
    return out


def dense_selection(bsz: int, h_kv: int, q_len: int, k_len: int, segment_size: int, block_size: int, device):
    """The selection under which block-sparse attention is dense causal attention (every segment dense)."""
    n_seg = geometry(q_len, k_len, segment_size, block_size).n_seg
    blocks = torch.full((bsz, h_kv, n_seg, 0), -1, dtype=torch.int32, device=device)
    return blocks, torch.ones(bsz, h_kv, n_seg, dtype=torch.bool, device=device)


__all__ = [
    "Geometry",
    "block_sparse_attention",
    "check_inputs",
    "dense_selection",
    "geometry",
    "masked_attention",
    "selection_mask",
]
