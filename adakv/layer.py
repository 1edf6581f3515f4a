"""One full-attention layer of an AdaKVCache."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from .attention import KVHandle
from .compression import Compressor, pack_kept
from .decode_eviction import DecodeAccumulator
from .scorers import ScoreInputs
from .storage import RaggedKV


class AdaKVLayer(CacheLayerMixin):
    """Compressed K/V of one layer: dense only during its prefill, then a :class:`RaggedKV`.

    ``update`` does not store anything itself: it hands the new K/V to adakv's
    attention function in a :class:`KVHandle`, which compresses the prompt (first
    call) or appends the new tokens (later calls), as it alone sees the queries
    and the padding mask. ``get_seq_length`` is the logical number of tokens seen,
    evicted ones included, so positions stay right.
    """

    # No `_layer_type`: setting one would register this class for every DynamicCache.
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, compressor: Compressor, check: Callable[[AdaKVLayer, torch.Tensor], None]):
        super().__init__()
        self.compressor = compressor
        self._check = check
        self.store: RaggedKV | None = None
        self.seen = 0
        self.rank, self.num_compressed = 0, 1  # index among the cache's compressed layers (set by the cache)
        self.kept_scores: torch.Tensor | None = None  # [B, H, M] scores of held tokens (cross-layer allocation only)
        self.decode: DecodeAccumulator | None = None  # eviction during decoding (H2O(accumulate_decode=True))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[KVHandle, KVHandle]:
        self._check(self, key_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        handle = KVHandle(self, key_states, value_states)
        return handle, handle

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store = None
        self.kept_scores = None
        self.decode = None
        self.seen = 0
        self.is_initialized = False

    def compress(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        valid: torch.Tensor,
        scaling: float,
        softcap: float | None,
        module: torch.nn.Module,
    ) -> None:
        """Select this layer's kept tokens from its dense prefill and compact them (once per prompt)."""
        inputs = ScoreInputs(
            query, keys, values, valid, self.compressor.window, scaling, softcap, module, self.rank, self.num_compressed
        )
        if not getattr(self.compressor.scorer, "accumulate_decode", False):
            self.store = RaggedKV.from_dense(keys, values, self.compressor.select(inputs))
            return
        keep, scores = self.compressor.select(inputs, with_scores=True)
        self.store = RaggedKV.from_dense(keys, values, keep)
        target = self.store.lengths()
        if isinstance(self.compressor.budget, int):  # short prompts may grow up to the budget
            target = target.clamp(min=self.compressor.budget)
        self.decode = DecodeAccumulator(pack_kept(scores, keep, fill=0.0), target, self.compressor.window)

    def after_attention(
        self, q: torch.Tensor, scaling: float, softcap: float | None, hidden: torch.Tensor | None
    ) -> None:
        """Decoding-time eviction: accumulate the new queries' attention, cut back if a head outgrew its target."""
        if self.decode is not None:
            self.decode.observe(q, self.store, scaling, softcap, hidden)
            self.decode.cut_back(self.store)

    # -- batch manipulation (beam search, contrastive search, num_return_sequences) --------------------------------
    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.store is not None:
            index = torch.as_tensor(indices, dtype=torch.long)
            self.store.select_batch(index)
            if self.decode is not None:
                self.decode.select_batch(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store is not None:
            self.batch_select_indices(torch.arange(self.store.shape[0]).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("AdaKVCache cannot be cropped: evicted tokens are gone (no assisted decoding).")

    def offload(self) -> None:
        raise NotImplementedError("AdaKVCache does not support offloading.")

    prefetch = offload

    # -- introspection ------------------------------------------------------------------------------------------------
    def kept_lengths(self) -> torch.Tensor | None:
        return None if self.store is None else self.store.lengths()

    def nbytes(self) -> int:
        return 0 if self.store is None else self.store.nbytes()
