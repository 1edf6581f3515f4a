"""Compacted ragged K/V storage of one layer: flat buffers plus per-segment metadata."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from . import host
from .kernels import ops_for

# Slack rows given to every segment when it is (re)laid out: a fixed minimum at
# prefill keeps the memory close to the budget; on growth every segment gets the same
# slack, GROWTH_FRACTION of the layer's mean length, so that re-layouts cost O(1)
# amortized per token. The same for all: a decoded token adds one row to every segment,
# so a slack sized by each segment's own length made Ada-KV's short heads re-lay the
# whole layer out every few tokens (for the same total slack).
MIN_SLACK = 16
GROWTH_FRACTION = 0.125


class RaggedKV:
    """Keys and values of ``batch x kv_heads`` segments of different lengths.

    ``keys``/``values``: ``[rows, head_dim]``; ``start``, ``length``: int64 ``[batch, kv_heads]`` on the
    buffers' device (each segment's capacity is kept on the host only). Host copies of the metadata
    are kept so that appends decide on growth without a device sync. ``ops`` is the
    backend (``adakv.kernels.backend``) its layer chose once; every op on the buffers goes through it.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        length: torch.Tensor,
        capacity: torch.Tensor,
        ops: SimpleNamespace | None = None,
    ):
        self.ops = ops if ops is not None else ops_for(keys)
        self.keys = keys
        self.values = values
        self.slack = MIN_SLACK  # rows every segment gets past its tokens when re-laid out
        self._length_host = length.to("cpu", torch.int64)
        self._cap_host = capacity.to("cpu", torch.int64)
        self.width = int(self._cap_host.max()) if self._cap_host.numel() else 0  # the widest segment can hold
        self._start_host = torch.cumsum(self._cap_host.reshape(-1), 0).reshape(self._cap_host.shape) - self._cap_host
        self._min_free = self._free()  # rows every segment can still take: decoding checks one int, not tensors
        device = keys.device
        # copies (not aliases, even on CPU): the host and device metadata are updated separately; not waiting
        # for the device (see adakv.host)
        self.length = self._length_host.to(device, copy=True, non_blocking=True)
        self.start = self._start_host.to(device, copy=True, non_blocking=True)
        self._counters: torch.Tensor | None = None  # scratch of the fused decode op, made at its first use
        self.static = False  # see fix_addresses

    # Host lengths are folded lazily: a decoded token (the same count appended to every segment) only bumps
    # Python ints, so a decode step runs no host tensor op and can be traced or captured in a CUDA graph.
    @property
    def _length_host(self) -> torch.Tensor:
        if self._pending:  # every segment grew by the same count: so did the longest
            self._lengths_cpu = self._lengths_cpu + self._pending
            self._max_base += self._pending
            self._pending = 0
        return self._lengths_cpu

    @_length_host.setter
    def _length_host(self, value: torch.Tensor) -> None:
        self._lengths_cpu = value
        self._host_lists = None  # host_segments' lists, keyed on the lengths tensor they came from
        self._pending = 0
        self._max_base = int(value.max()) if value.numel() else 0

    # -- construction -------------------------------------------------------------
    @staticmethod
    def _alloc(n_rows: int, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(n_rows, like.shape[-1], dtype=like.dtype, device=like.device)

    @classmethod
    def from_dense(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        keep: torch.Tensor,
        slack: int = MIN_SLACK,
        ops: SimpleNamespace | None = None,
    ) -> RaggedKV:
        """Compact the tokens selected by ``keep`` ``[B, H, L]`` out of dense ``[B, H, L, D]`` tensors. The kept
        counts are read on the host (they size the buffers): the one wait for the device of a compaction."""
        (length,) = host.to_host(keep.sum(-1))
        capacity = length + slack
        total = int(capacity.sum())
        store = cls(cls._alloc(total, keys), cls._alloc(total, values), length, capacity, ops)
        store.slack = slack
        store.ops.compact_(store.keys, store.values, keys, values, keep, store.start)
        return store

    # -- queries ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self._length_host.shape)

    def lengths(self) -> torch.Tensor:
        """Tokens held per segment, int64 ``[batch, kv_heads]`` on CPU."""
        return self._length_host.clone()

    def host_segments(self) -> tuple[list[int], list[int]]:
        """Every segment's start and length as Python ints (row-major), from the host bookkeeping. The lists are
        rebuilt only when the lengths were replaced; a decoded token just adds the pending count (no tensor op),
        which is what the CPU attention loops over."""
        lengths_cpu, pending = self._lengths_cpu, self._pending
        cached = self._host_lists
        if cached is None or cached[0] is not lengths_cpu:
            cached = self._host_lists = (
                lengths_cpu,
                self._start_host.reshape(-1).tolist(),
                lengths_cpu.reshape(-1).tolist(),
            )
        if not pending:
            return cached[1], cached[2]
        return cached[1], [n + pending for n in cached[2]]

    def max_length(self) -> int:
        """The longest segment, from the host bookkeeping (no device sync, no tensor op)."""
        return self._max_base + self._pending

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def _free(self) -> int:
        return int((self._cap_host - self._length_host).min()) if self._length_host.numel() else 0

    # -- mutation -----------------------------------------------------------------
    def _relayout(self, capacity: torch.Tensor, source_index: torch.Tensor | None = None) -> None:
        """Move every segment into fresh buffers with the given capacities.

        ``source_index`` (int64 ``[batch]``) makes new row b a copy of old row
        ``source_index[b]`` (beam reordering, batch selection or repetition).
        """
        src_start, length = self.start, self._length_host
        if source_index is not None:
            idx_host = source_index.to("cpu", torch.int64)
            src_start = src_start[source_index.to(src_start.device)]
            length = length[idx_host]
        total = int(capacity.sum())
        new = RaggedKV(self._alloc(total, self.keys), self._alloc(total, self.values), length, capacity, self.ops)
        self.ops.copy_segments_(new.keys, new.values, self.keys, self.values, src_start, new.start, new.length)
        self._become(new)

    def _become(self, new: RaggedKV) -> None:
        """Take ``new``'s buffers and metadata, keeping this storage's slack and address policy."""
        new.slack, new.static = self.slack, self.static
        self.__dict__.update(new.__dict__)
        if self.static:
            self.fix_addresses()

    def fix_addresses(self) -> None:
        """Tag the tensors a decode step mutates (buffers, starts, lengths, the fused op's counters) as fixed
        addresses for torch.compile, as transformers' StaticCache does, so that CUDA graphs (generate's default
        ``reduce-overhead``) are not skipped for mutated inputs. Unguarded, as StaticCache's: a new cache or a
        re-layout (new tensors) does not recompile the step; CUDA graph trees check static inputs' addresses at
        each replay and record again when they changed. Kept through later re-layouts."""
        self.static = True
        if torch.compiler.is_compiling():
            return
        for tensor in (self.keys, self.values, self.start, self.length, self._counter_scratch()):
            torch._dynamo.mark_static_address(tensor)

    def _counter_scratch(self) -> torch.Tensor:
        """The fused decode op's per-segment counters: zeros, made once (the op leaves them at zero)."""
        if self._counters is None:
            self._counters = torch.zeros(self.length.numel(), dtype=torch.int32, device=self.length.device)
        return self._counters

    def has_room(self, q_len: int) -> bool:
        """Every segment can take ``q_len`` more tokens without a re-layout (one int compared, no tensor op)."""
        return q_len <= self._min_free

    def make_room(self, q_len: int, rows: int) -> None:
        """Unless every segment can take ``q_len`` more tokens, re-lay out with ``max(rows, q_len)`` free rows in
        every segment."""
        if not self.has_room(q_len):
            self._relayout(self._length_host + max(rows, q_len))

    def _took(self, q_len: int) -> None:
        """Host bookkeeping of ``q_len`` tokens appended to every segment: Python ints only."""
        self._pending += q_len
        self._min_free -= q_len

    def append(
        self,
        new_k: torch.Tensor,
        new_v: torch.Tensor,
        valid: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
    ) -> None:
        """Append ``[B, H, Q, D]`` tokens (only those where ``valid[b, q]``) to every segment; ``counts``: ``valid``'s
        per-sequence sums on the host, when the caller has read them already."""
        q_len = new_k.shape[2]
        if valid is None and self.has_room(q_len):  # decoding: room everywhere, no tensor op on the host
            self.ops.append_(self.keys, self.values, new_k, new_v, self.start, self.length)
            self._took(q_len)
            self.length += q_len  # a scalar: no host-to-device copy (that would sync) per decoded token
            return
        if torch.compiler.is_compiling():  # growing re-lays the storage out from host counts: not in a graph
            raise RuntimeError(
                f"An AdaKVCache segment has no room for {q_len} more token(s) inside a compiled forward (its reserve "
                "is used up). Call cache.make_room(n) before each compiled forward of n tokens (generate does it), "
                "or give the cache a larger reserve=."
            )
        if valid is None:
            added = torch.full((new_k.shape[0], 1), q_len, dtype=torch.int64)
        elif counts is not None:
            added = counts.to("cpu", torch.int64).reshape(-1, 1)
        else:
            (added,) = host.to_host(valid.sum(-1, keepdim=True))
        needed = self._length_host + added
        if bool((needed > self._cap_host).any()):
            slack = max(self.slack, int(float(needed.double().mean()) * GROWTH_FRACTION))
            self._relayout(needed + slack)
        self.ops.append_(self.keys, self.values, new_k, new_v, self.start, self.length, valid)
        self._length_host = self._length_host + added
        self._min_free = self._free()
        self.length += q_len if valid is None else host.to_device(added, self.length.device)

    def decode(
        self,
        q: torch.Tensor,
        new_k: torch.Tensor,
        new_v: torch.Tensor,
        scaling: float,
        softcap: float | None,
        width: int,
    ) -> torch.Tensor:
        """Append one token ``[B, H, 1, D]`` to every segment and attend ``q`` ``[B, H, G, 1, D]`` over the result,
        in the backend's one fused launch (``ops.decode_``; the caller checked :meth:`has_room` (1)). ``width``
        sizes the launch: >= the longest segment after the append; a fixed value gives a fixed grid."""
        out = self.ops.decode_(
            q,
            new_k,
            new_v,
            self.keys,
            self.values,
            self.start,
            self.length,
            self._counter_scratch(),
            scaling,
            softcap,
            width,
        )
        self._took(1)
        return out

    def truncate(self, length: torch.Tensor) -> None:
        """Forget every row past ``length`` ``[B, H]`` (host int64) in each segment: tokens appended only for a
        scoring pass. Capacity is kept."""
        length = length.to("cpu", torch.int64)
        if bool((length > self._length_host).any()):
            raise ValueError("truncate can only shorten segments.")
        self._length_host = length.clone()
        self.length = length.to(self.length.device, copy=True, non_blocking=True)
        if self.static:
            self.fix_addresses()
        self._min_free = self._free()

    def view(self, buffer: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A dense ``[B, H, M, ...]`` copy of ``buffer``'s segments, right-aligned (a segment's last token in
        column M - 1, shorter segments padded at the front), and its in-segment mask ``[B, H, M]``.

        Right alignment puts the most recent tokens of every head in the same columns, which is what scorers
        expect (their observation window is the last columns). M = ``width`` or the longest segment.
        """
        max_len = self.max_length() if width is None else width
        offs = torch.arange(max_len, device=self.start.device)
        pad = max_len - self.length[..., None]  # [B, H, 1]
        inside = offs >= pad
        idx = (self.start[..., None] + offs - pad).clamp_(min=0, max=max(buffer.shape[0] - 1, 0))
        return buffer[idx], inside

    def rows_to_view(self, rows: torch.Tensor, fill: float | bool, width: int | None = None) -> torch.Tensor:
        """Per-row values ``[B, H, M']`` (row order, as ``pack_kept`` gives them) lined up with :meth:`view`'s
        columns ``[B, H, width]``; ``fill`` in front of shorter segments."""
        width = self.max_length() if width is None else width
        rows = fit_width(rows, width, fill)
        pad = width - self.length.to(rows.device)[..., None]
        offs = torch.arange(width, device=rows.device)
        return rows.gather(-1, (offs - pad).clamp(min=0)).masked_fill(offs < pad, fill)

    def retain(self, keep: torch.Tensor) -> None:
        """Keep only the tokens where ``keep`` ``[B, H, M]`` (over each segment's rows, in row order) is True."""
        width = max(self.max_length(), 1)
        right = self.rows_to_view(keep, False, width)  # the same mask, right-aligned
        keys, inside = self.view(self.keys, width)
        values, _ = self.view(self.values, width)
        self.replace(keys, values, right & inside)

    def replace(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
        """Re-lay out the storage with the tokens ``keep`` selects from a dense ``[B, H, M, D]`` view."""
        self._become(RaggedKV.from_dense(keys, values, keep, slack=self.slack, ops=self.ops))

    def select_batch(self, index: torch.Tensor) -> None:
        """Make row b a copy of row ``index[b]`` (reorder, select or repeat sequences)."""
        self._relayout(self._cap_host[index.to("cpu", torch.int64)], source_index=index)


def fit_width(values: torch.Tensor, width: int, fill: float | bool) -> torch.Tensor:
    """``values`` ``[..., M]`` cut or padded with ``fill`` to ``[..., width]``."""
    values = values[..., :width]
    if values.shape[-1] < width:
        values = torch.nn.functional.pad(values, (0, width - values.shape[-1]), value=fill)
    return values
