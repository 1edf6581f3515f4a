"""Kernels of adakv, installed as ``adakv.kernels``.

Every operation has a pure-torch reference in :mod:`adakv.kernels.reference`;
the Triton versions (``triton_copy``, ``triton_attention``) compute the same
and are tested against it. :func:`ops_for` picks the implementation for a tensor.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import SimpleNamespace

import torch

from . import reference, torch_ragged
from .reference import append_, compact_, copy_segments_, ragged_attention

BACKENDS = ("torch", "triton", "triton-fused", "flash")
_OPS = ("compact_", "copy_segments_", "append_", "ragged_attention")


@functools.cache  # built once: this runs for every decoded token and layer
def _triton_ops(fused_decode: bool = False) -> SimpleNamespace:
    """The Triton kernels; ``fused_decode``: a decoded token takes the one-launch ``triton_decode.decode_`` (the
    ``triton-fused`` backend) instead of append + attention + merge. It is opt-in until it has been run on a GPU:
    the interpreter runs programs one after another, so the cross-program merge is only proven there."""
    try:
        copy = importlib.import_module(".triton_copy", __name__)
        attn = importlib.import_module(".triton_attention", __name__)
        fused = importlib.import_module(".triton_decode", __name__)
    except ImportError as err:  # triton missing or broken
        raise ValueError(f"ADAKV_BACKEND=triton, but Triton cannot be imported ({err}). pip install triton.") from err
    return SimpleNamespace(
        name="triton-fused" if fused_decode else "triton",
        compact_=copy.compact_,
        copy_segments_=copy.copy_segments_,
        append_=copy.append_,
        ragged_attention=attn.ragged_attention,
        ragged_attention_static=attn.ragged_attention,  # its grid comes from max_len: fixed when given a fixed width
        decode_=fused.decode_ if fused_decode else None,  # one decoded token in one launch, or None: unfused
        decode_group_limit=fused.MAX_GROUP if fused_decode else 0,
    )


@functools.cache
def _flash_ops() -> SimpleNamespace:
    """The Triton ops, with decoded tokens attended by flash varlen (``flash_attention``): each segment one packed
    sequence, its slack skipped by ``seqused_k``. Calls flash cannot compute exactly go to the Triton kernel."""
    flash = importlib.import_module(".flash_attention", __name__)
    triton_ops = _triton_ops()

    def ragged_attention(q, k_buf, v_buf, start, length, scaling, softcap=None, hidden=None, max_len=None, **host):
        if max_len is not None and flash.takes(q, softcap, hidden):
            return flash.decode_attention(q, k_buf, v_buf, start, length, scaling, max_len)
        return triton_ops.ragged_attention(q, k_buf, v_buf, start, length, scaling, softcap, hidden, max_len, **host)

    changed = {"name": "flash", "ragged_attention": ragged_attention, "ragged_attention_static": ragged_attention}
    return SimpleNamespace(**{**vars(triton_ops), **changed})


_REFERENCE = SimpleNamespace(
    name="torch",
    decode_=None,  # no fused decode step: append_ then ragged_attention
    decode_group_limit=0,
    **{op: getattr(reference, op) for op in _OPS},
)
_REFERENCE.ragged_attention = torch_ragged.ragged_attention  # the copy-free CPU version; reference.py stays the oracle
# fixed shapes for a given max_len and no host reads: what torch.compile / CUDA graphs need (torch_ragged loops on
# host metadata)
_REFERENCE.ragged_attention_static = reference.ragged_attention


def default_backend() -> str | None:
    """``$ADAKV_BACKEND`` (validated), or None for the device default. Read once, when a cache is built."""
    forced = os.environ.get("ADAKV_BACKEND", "").strip().lower()
    if not forced:
        return None
    if forced not in BACKENDS:
        raise ValueError(f"ADAKV_BACKEND={forced!r} is not a backend; use one of {', '.join(BACKENDS)}.")
    return forced


def check_backend(name: str | None) -> str | None:
    """Validate a backend name given to a cache (None: the device's default)."""
    if name is None:
        return None
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None (the device default), got {name!r}.")
    return name.lower()


def backend_name(device: torch.device, name: str | None = None) -> str:
    """``name`` if given, else Triton on CUDA and the torch reference elsewhere."""
    if name is not None:
        return name
    return "triton" if device.type == "cuda" else "torch"


def backend(name: str | None, device: torch.device) -> SimpleNamespace:
    """The implementation of adakv's ops called ``name`` (None: the device default) for tensors on ``device``.

    Resolved once per cache layer (when it first sees a tensor), then kept with its storage.
    """
    name = backend_name(device, check_backend(name))
    if name == "torch":
        return _REFERENCE
    if name in ("triton", "triton-fused"):
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"The {name} backend needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels on the CPU "
                "(slow; for testing)."
            )
        return _triton_ops(name == "triton-fused")
    why = importlib.import_module(".flash_attention", __name__).unavailable(device)
    if why is not None:
        raise ValueError(f"The flash backend cannot run here: {why}. Use backend='triton' (CUDA) or 'torch'.")
    return _flash_ops()


def ops_for(tensor: torch.Tensor) -> SimpleNamespace:
    """The ops ``$ADAKV_BACKEND`` (or the device default) gives for ``tensor``'s device: for scripts and tests;
    caches resolve their backend once, with :func:`backend`."""
    return backend(default_backend(), tensor.device)


__all__ = [
    "BACKENDS",
    "append_",
    "backend",
    "backend_name",
    "check_backend",
    "compact_",
    "copy_segments_",
    "default_backend",
    "ops_for",
    "ragged_attention",
]
