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

BACKENDS = ("torch", "triton", "flash")
_OPS = ("compact_", "copy_segments_", "append_", "ragged_attention")


@functools.cache  # built once: this runs for every decoded token and layer
def _triton_ops() -> SimpleNamespace:
    try:
        copy = importlib.import_module(".triton_copy", __name__)
        attn = importlib.import_module(".triton_attention", __name__)
    except ImportError as err:  # triton missing or broken
        raise ValueError(f"ADAKV_BACKEND=triton, but Triton cannot be imported ({err}). pip install triton.") from err
    return SimpleNamespace(
        name="triton",
        compact_=copy.compact_,
        copy_segments_=copy.copy_segments_,
        append_=copy.append_,
        ragged_attention=attn.ragged_attention,
    )


_REFERENCE = SimpleNamespace(name="torch", **{op: getattr(reference, op) for op in _OPS})
_REFERENCE.ragged_attention = torch_ragged.ragged_attention  # the copy-free CPU version; reference.py stays the oracle


def backend_name(device: torch.device) -> str:
    """``$ADAKV_BACKEND`` if set, else Triton on CUDA and the torch reference elsewhere."""
    forced = os.environ.get("ADAKV_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"ADAKV_BACKEND={forced!r} is not a backend; use one of {', '.join(BACKENDS)}.")
        return forced
    return "triton" if device.type == "cuda" else "torch"


def ops_for(tensor: torch.Tensor) -> SimpleNamespace:
    """The implementation of adakv's ops for tensors on ``tensor``'s device."""
    name = backend_name(tensor.device)
    if name == "torch":
        return _REFERENCE
    if name == "triton":
        if tensor.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "ADAKV_BACKEND=triton needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels on the CPU "
                "(slow; for testing)."
            )
        return _triton_ops()
    raise ValueError(
        "ADAKV_BACKEND=flash: decoding through flash-attn is not available in this version of adakv; "
        "use ADAKV_BACKEND=triton (CUDA) or torch."
    )


__all__ = ["BACKENDS", "append_", "backend_name", "compact_", "copy_segments_", "ops_for", "ragged_attention"]
