"""AdaKVCache: a head-wise compressed KV cache, drop-in for transformers 5.x."""

from __future__ import annotations

import copy

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    DynamicSlidingWindowLayer,
    get_layer_types_and_kwargs,
)

from . import attention, prompt
from .allocators import Allocator, get_allocator
from .decode import DecodePolicy, get_decode_policy
from .kernels import backend as kernel_backend
from .kernels import check_backend, default_backend
from .layer import AdaKVLayer
from .methods import get_method
from .policy import CHUNK_SCORES, CachePolicy, PrefillAttention, SharedState
from .scorers import Scorer, get_scorer
from .selection import Selection

STOCK_LAYER_TYPES = ("sliding_attention", "chunked_attention")


def _config_of(model: object) -> tuple[PreTrainedModel | None, PretrainedConfig]:
    if isinstance(model, PreTrainedModel):
        return model, model.config
    if isinstance(model, PretrainedConfig):
        return None, model
    raise TypeError(
        f"AdaKVCache needs the model (a transformers PreTrainedModel) or its config, got {type(model).__name__}."
    )


def _check_model(model: PreTrainedModel | None, config: PretrainedConfig) -> None:
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"AdaKVCache supports decoder-only models; {type(model or config).__name__} is encoder-decoder."
        )
    if model is None:
        return
    uses_interface = getattr(model, "_supports_attention_backend", False) and model._can_set_attn_implementation()
    if not uses_interface:
        raise ValueError(
            f"{type(model).__name__} does not run its attention through transformers' AttentionInterface, so "
            "AdaKVCache cannot plug into it. Supported: Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi3 and other "
            "decoders whose attention calls ALL_ATTENTION_FUNCTIONS."
        )


def layer_kv_bytes(layer: object) -> int:
    """Bytes of K/V one cache layer holds (compacted storage for adakv layers, dense tensors otherwise)."""
    if isinstance(layer, AdaKVLayer):
        return layer.nbytes()
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    return 0 if keys is None or values is None else keys.nbytes + values.nbytes


def kv_bytes(cache: Cache) -> int:
    """Bytes of K/V storage any transformers cache holds now (all layers; an AdaKVCache's slack included).

    Use it to compare an AdaKVCache with a DynamicCache on the same footing.
    """
    return sum(layer_kv_bytes(layer) for layer in cache.layers)


class UpdateCheck:
    """What every ``AdaKVLayer.update`` verifies first. Holds no reference to the cache or its layers,
    so a cache is freed as soon as it is dropped (no reference cycle waiting for the garbage collector)."""

    def __init__(self, text_config: PretrainedConfig, kv_shape: tuple[int, int]):
        self.text_config = text_config
        self.kv_shape = kv_shape

    def __call__(self, layer: AdaKVLayer, key_states: torch.Tensor) -> None:
        if not attention.is_active(self.text_config):
            raise ValueError(
                "This AdaKVCache's model no longer uses adakv's attention (its attention implementation was switched "
                f"to {self.text_config._attn_implementation!r}). Create a new AdaKVCache(model, ...) after switching."
            )
        if key_states.dim() != 4 or tuple(key_states.shape[1:2]) + tuple(key_states.shape[3:]) != self.kv_shape:
            raise ValueError(
                f"This AdaKVCache was made for a model with (kv_heads, head_dim) = {self.kv_shape}, "
                f"but got key states of shape {tuple(key_states.shape)}. Create one AdaKVCache per model."
            )
        held = layer.store.shape[0] if layer.store is not None else key_states.shape[0]
        check_batch(held, key_states.shape[0])


def check_batch(held: int, called: int) -> None:
    """Refuse a forward whose batch is not the one the cache holds, saying what to do."""
    if called != held:
        raise ValueError(
            f"This AdaKVCache holds {held} sequences but the model was called with a batch of {called}. For beam "
            "search or num_return_sequences on an already filled cache, call cache.batch_repeat_interleave(num_beams) "
            "first; for another batch, cache.reset() (or a new cache)."
        )


class StockSlidingLayer(DynamicSlidingWindowLayer):
    """transformers' sliding-window cache layer, unchanged but for the batch check the compressed layers make: in a
    model whose first layers slide (Gemma 2/3) a forward with another batch would otherwise fail inside torch.cat
    before any compressed layer could say why. (No ``_layer_type``: it would register this class for every cache.)"""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.is_initialized:
            check_batch(self.keys.shape[0], key_states.shape[0])
        return super().update(key_states, value_states, *args, **kwargs)


class AdaKVCache(Cache):
    """A KV cache that keeps only the tokens that matter, a different number per (sequence, KV head).

    ``AdaKVCache(model, budget=0.2)`` activates adakv's attention function on the
    model (through ``AttentionInterface``; other caches keep behaving as before)
    and is passed to ``model.generate(..., past_key_values=cache)`` or the forward.
    The prompt is compressed as it goes through each full-attention layer: the scorer
    rates every token, the allocator picks the kept ones per KV head, and they are
    compacted into one flat buffer per layer; the dense prompt K/V are freed.
    Later tokens (decoding, or a question appended to a compressed context) are
    appended in place and attended with ragged attention.

    Args:
        model: the model (or its config) the cache is for.
        budget: float in (0, 1]: fraction of each prompt's tokens kept, averaged over
            KV heads; int >= 1: average tokens kept per KV head. The observation
            window counts inside it. A prompt within budget is kept whole.
        scorer: a :class:`~adakv.scorers.Scorer` or a name (default ``"snapkv"``).
        allocator: an :class:`~adakv.allocators.Allocator` or a name (default ``"adakv"``).
        window: observation window: the last ``window`` prompt tokens are always kept
            and their queries score the rest.
        method: a named preset instead of scorer/allocator (``adakv.METHODS``), e.g.
            ``"defensivekv"``, ``"ada-criticalkv"``, ``"pyramidkv"``, ``"streamingllm"``.
        decode: what happens while decoding: None keeps every decoded token; ``"rescore"``
            (:class:`~adakv.decode.Rescore`) or ``"h2o"`` (:class:`~adakv.decode.H2ODecode`), or an
            instance, keep the cache within its budget however long the generation.
        backend: ``"torch"``, ``"triton"``, ``"triton-fused"`` (Triton, with a decoded token in one fused
            launch) or ``"flash"`` (decoded tokens through torch's flash varlen attention; CUDA), the last two
            opt-in until run on a GPU (None: ``$ADAKV_BACKEND`` if set, else Triton on CUDA and torch
            elsewhere), fixed when the cache is built and checked against the model's device.
        prefill_attention: a :class:`~adakv.policy.PrefillAttention` (e.g. CritiPrefill) computing
            the first prompt chunk's attention instead of the model's dense attention.
        reserve: rows reserved in every segment at each compaction for the tokens to come (e.g. the
            ``max_new_tokens`` of a generation). Until a segment's reserve is used up, a decode step has fixed
            shapes and no host tensor op, so ``torch.compile(fullgraph=True)`` traces it without a break and a
            CUDA graph can replay it. None: a 16-row slack that grows geometrically (less memory).
        chunk_scores: how a held token is scored when a later prompt chunk cuts the cache back:
            ``"latest"`` by the scorer's new scores only, ``"max"`` by the best score it has had at any cut (its
            new one or the one that kept it last time; a cut that kept everything scores nothing). None (the
            default): the scorer's ``chunk_scores`` (``"max"`` for DefensiveKV, ``"latest"`` for the others).
            With one prompt forward there is one cut and both are the same; a context scorer (KVzip) cuts once
            too. A decode policy starts from the last cut's own scores either way. The held scores (one float
            per held token) are freed at the first forward that is not a prompt chunk (a question, decoding); a
            later ``compressing()`` chunk then ranks the held tokens by their new scores.

    A prompt may come in chunks: inside ``with cache.compressing():`` or
    ``generate(..., prefill_chunk_size=N)`` every forward is a prompt chunk, and after
    each one every head is cut back to its allocation of all the tokens seen so far
    (``adakv.prefill_in_chunks`` feeds a document that way). Otherwise only the first
    forward is compressed. Sliding-window layers (Gemma2/3, Mistral with a window) keep
    transformers' own dynamic layer. Padding must be on the left.
    """

    def __init__(
        self,
        model: PreTrainedModel | PretrainedConfig,
        budget: float | int,
        scorer: str | Scorer | None = None,
        allocator: str | Allocator | None = None,
        window: int = 32,
        method: str | None = None,
        decode: str | DecodePolicy | None = None,
        backend: str | None = None,
        prefill_attention: PrefillAttention | None = None,
        reserve: int | None = None,
        chunk_scores: str | None = None,
    ):
        if method is not None:
            if scorer is not None or allocator is not None:
                raise ValueError("Pass either method=... or scorer=/allocator=, not both.")
            scorer_obj, allocator_obj = get_method(method)
        else:
            scorer_obj = get_scorer("snapkv" if scorer is None else scorer)
            allocator_obj = get_allocator("adakv" if allocator is None else allocator)
        selection = Selection(budget, scorer_obj, allocator_obj, window)
        decode_obj = get_decode_policy(decode)
        if decode_obj is not None:
            decode_obj.check(selection)
        if prefill_attention is not None and not isinstance(prefill_attention, PrefillAttention):
            raise TypeError(
                f"prefill_attention must be a PrefillAttention (e.g. adakv.CritiPrefill()), got "
                f"{type(prefill_attention).__name__}."
            )
        backend = check_backend(backend) if backend is not None else default_backend()
        if reserve is not None and (isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0):
            raise ValueError(
                f"reserve must be None or an int >= 0 (rows per segment for the tokens to come), got {reserve!r}."
            )
        # None: the scorer's own default (a two-stage scorer's, not its base's)
        source = "chunk_scores" if chunk_scores is not None else f"{type(scorer_obj).__name__}.chunk_scores"
        chunk_scores = scorer_obj.chunk_scores if chunk_scores is None else chunk_scores
        if chunk_scores not in CHUNK_SCORES:
            raise ValueError(f"{source} must be one of {CHUNK_SCORES} (or None: the scorer's), got {chunk_scores!r}.")
        policy = CachePolicy(selection, decode_obj, backend, prefill_attention, reserve, chunk_scores)
        model_obj, config = _config_of(model)
        _check_model(model_obj, config)
        if model_obj is not None and backend is not None:  # refused now, not at the first forward
            kernel_backend(backend, model_obj.device)
        if prefill_attention is not None:
            prefill_attention.check_model(model_obj if model_obj is not None else config)
        if model_obj is not None:  # a scorer that cannot score this model is refused now, not at the first forward
            scorer_obj.check_model(model_obj)
        text_config = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        unsupported = sorted(set(layer_types) - {"full_attention", *STOCK_LAYER_TYPES})
        if unsupported:
            raise ValueError(
                f"AdaKVCache supports attention layers only; {type(config).__name__} has {unsupported} layers."
            )
        if "full_attention" not in layer_types:
            raise ValueError(
                f"{type(config).__name__} has only sliding-window layers (sliding_window="
                f"{getattr(text_config, 'sliding_window', None)}), which AdaKVCache leaves uncompressed, so it would "
                "save nothing. Use a model (or config) with full-attention layers."
            )
        name = attention.implementation_for(config)

        self.policy = policy
        self.shared = SharedState(policy)
        self._config = config
        self._text_config = text_config
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        check = UpdateCheck(text_config, (kv_heads, head_dim))
        n_full = layer_types.count("full_attention")
        layers, rank = [], 0
        for kind, kw in zip(layer_types, layer_kwargs):
            if kind == "full_attention":
                layers.append(AdaKVLayer(policy, self.shared, check, rank, n_full))
                layers[-1].module_checked = model_obj is not None  # else at its first forward
                rank += 1
            else:
                stock = DYNAMIC_LAYER_TYPE_MAPPING[kind]
                layers.append((StockSlidingLayer if stock is DynamicSlidingWindowLayer else stock)(**kw))
        self._link_cascade(layers)
        self._first_compressed = layer_types.index("full_attention")  # decides each forward's prompt phase
        super().__init__(layers=layers)
        attention.activate(model if model_obj is not None else config, name)  # last: nothing changes on bad input

    def _link_cascade(self, layers: list) -> None:
        if self.shared.cascade is not None:
            self.shared.cascade.set_layers([layer for layer in layers if isinstance(layer, AdaKVLayer)])

    @property
    def selection(self) -> Selection:
        """The cache's selection policy (budget, scorer, allocator, window)."""
        return self.policy.selection

    def compressing(self):
        """A context manager: every forward inside it is a prompt chunk, compressed against the budget of all
        the tokens seen so far (by default only the first forward is). For feeding a long document in chunks::

            with cache.compressing():
                for chunk in chunks:
                    model(chunk, **with_cache(cache))

        (``adakv.prefill_in_chunks`` does this with the right masks and positions.)"""
        return prompt.compressing(self)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"This AdaKVCache was made for a model with {len(self.layers)} layers, but layer {layer_idx} "
                "wrote to it. "
                "Create one AdaKVCache per model."
            )
        if layer_idx == 0:  # the forward's first layer decides, before any layer stores anything
            first = self.layers[self._first_compressed]
            self.shared.phase.begin_forward(key_states.shape[-2], first.store is None, self.policy.selection.window)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def is_compileable(self) -> bool:
        # generate compiles the forwards of its chunked prefill too when the cache is compileable; prompt chunks
        # compress (host syncs, the chunk detection's frame walk), so inside that loop the cache says no and the
        # chunks run eager. The decode loop asks outside it. (No frame walk while tracing: it cannot run there.)
        # Cache.is_compileable's rule written out: dynamo 2.11 cannot trace `super()` in a property.
        if not self.layers or not all(layer.is_compileable for layer in self.layers):
            return False
        return torch.compiler.is_compiling() or prompt.generate_chunk_size() is None

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        # transformers asks this whenever it builds a forward's mask: at the start of every model forward, and for
        # a compileable cache in generate's prepare_inputs_for_generation too, in eager code before the compiled
        # step: the one moment that step leaves to refill the reserve outside its graph. Not while tracing.
        if self.policy.reserve is not None and not torch.compiler.is_compiling():
            self.make_room(query_length)
        return super().get_mask_sizes(query_length, layer_idx)

    def make_room(self, tokens: int) -> None:
        """With ``reserve=`` and ``tokens`` up to the reserve: if any segment of a layer cannot take ``tokens`` more,
        re-lay the layer out with the reserve free again in every segment (otherwise nothing). transformers' mask
        building calls it before every forward (:meth:`get_mask_sizes`), but not inside a compiled model's trace:
        call it yourself before each forward of a compiled model you call directly (not through generate), or a
        full segment breaks the graph (an error under ``fullgraph=True``)."""
        for layer in self.layers:
            if isinstance(layer, AdaKVLayer):
                layer.make_room(tokens)

    def __deepcopy__(self, memo: dict) -> AdaKVCache:
        """A copy with its own layers and policy state; the model's config objects stay shared (they are the
        model's, and attention activation lives on them). The copied cascade points at the copied layers."""
        for config in (self._config, self._text_config):
            memo[id(config)] = config
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            setattr(new, name, copy.deepcopy(value, memo))
        new._link_cascade(new.layers)
        return new

    # -- introspection ------------------------------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        """Bytes of K/V storage the cache holds now, all layers, slack included."""
        return kv_bytes(self)

    def kept_lengths(self, layer_idx: int) -> torch.Tensor:
        """Tokens held per (sequence, KV head) of a compressed layer: int64 ``[batch, kv_heads]``."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, AdaKVLayer):
            raise ValueError(
                f"Layer {layer_idx} is a {type(layer).__name__} (sliding window), not compressed by adakv."
            )
        lengths = layer.kept_lengths()
        if lengths is None:
            raise ValueError(f"Layer {layer_idx} holds nothing yet: run the prompt through the model first.")
        return lengths

    def stats(self) -> str:
        """A readable per-layer summary: tokens seen, kept per KV head (min/mean/max), bytes."""
        rows = [f"{self!r}", f"{'layer':>5} {'kind':<8} {'seen':>7} {'kept min':>9} {'mean':>8} {'max':>7} {'KiB':>9}"]
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, AdaKVLayer) and layer.store is not None:
                kept = layer.store.lengths().double()
                rows.append(
                    f"{idx:>5} {'adakv':<8} {layer.seen:>7} {int(kept.min()):>9} {kept.mean():>8.1f} "
                    f"{int(kept.max()):>7} {layer.nbytes() / 1024:>9.1f}"
                )
            else:
                seen = layer.get_seq_length()
                nbytes = layer_kv_bytes(layer)
                kind = "adakv" if isinstance(layer, AdaKVLayer) else "stock"
                rows.append(f"{idx:>5} {kind:<8} {seen:>7} {'-':>9} {'-':>8} {'-':>7} {nbytes / 1024:>9.1f}")
        rows.append(f"total K/V bytes: {self.kv_bytes()}")
        return "\n".join(rows)

    def __repr__(self) -> str:
        decode = "" if self.policy.decode is None else f", decode={self.policy.decode!r}"
        return f"AdaKVCache({self.policy.selection!r}{decode}, layers={len(self.layers)})"
