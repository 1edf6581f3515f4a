"""Small tensors between the host and the model's device, with as few waits as possible.

A device-to-host read makes the host wait until the device has run everything queued before it (a host sync):
on a GPU the launch queue drains, and the kernels launched after it start late. A layer's prefill needs a few
host values (how many tokens each sequence has, how many each head kept, to size buffers and budgets): it reads
them through :func:`to_host`, one transfer for several tensors, so the sync count is one per read, not one per
tensor. Host-to-device copies of the small host tensors (budgets, lengths) go through :func:`to_device`,
non-blocking: a blocking copy waits for the device too. The source is pageable memory, which CUDA stages before
the call returns, so the host tensor may be dropped or replaced right after.
"""

from __future__ import annotations

import torch


def to_host(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Integer (or bool) ``tensors`` as int64 CPU tensors of the same shapes, in one device-to-host transfer."""
    flat = torch.cat([t.reshape(-1).to(torch.int64) for t in tensors])
    host = flat.to("cpu")  # the one wait for the device
    return tuple(part.reshape(t.shape) for part, t in zip(host.split([t.numel() for t in tensors]), tensors))


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (small, on the host) on ``device`` without waiting for the device; an alias where it already
    is there, so never write into the result."""
    return tensor.to(device, non_blocking=True)
