"""One full-attention layer of an AdaKVCache: it owns its storage and its whole life."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import CacheLayerMixin

from . import host
from .kernels import backend
from .scorers import PassAttention, ScoreInputs
from .selection import Choice, map_scores, pack_kept, raw_scores
from .storage import MIN_SLACK, RaggedKV, fit_width

if TYPE_CHECKING:
    from .policy import CachePolicy, SharedState

PASS_BLOCK = 512  # queries of a scoring pass attended at once (bounds the pass's attention memory)


class KVHandle:
    """What ``AdaKVLayer.update`` returns in place of key/value tensors.

    It carries the layer and the new tokens' K/V to adakv's attention function, which hands them back to
    :meth:`AdaKVLayer.attend` with the queries and the padding. Anything else that touches it (a stock
    attention function) gets a clear error instead of a shape error.
    """

    __slots__ = ("layer", "keys", "values")

    def __init__(self, layer: AdaKVLayer, keys: torch.Tensor, values: torch.Tensor):
        self.layer = layer
        self.keys = keys
        self.values = values

    def __getattr__(self, name: str):
        if name.startswith("__"):  # protocol lookups (copy, torch.compile) are not tensor use
            raise AttributeError(name)
        raise ValueError(
            "An AdaKVCache's keys reached an attention function that is not adakv's (it asked them for "
            f"{name!r}): the cache was given to a model it was not created for, or whose attention implementation "
            "was switched afterwards. Create the cache for the model that uses it: AdaKVCache(model, ...)."
        )


class AdaKVLayer(CacheLayerMixin):
    """Compressed K/V of one layer, and every phase of its life.

    - a **prompt chunk** (the first forward; later ones inside ``cache.compressing()`` or
      ``generate(prefill_chunk_size=...)``): attend, score the held tokens plus the chunk with the
      cache's selection, keep each (sequence, KV head)'s allocation of the tokens seen so far, compact;
    - **appending** (decoded tokens, an appended question): write in place into the segments' slack,
      then ragged attention over the segments;
    - **evicting while decoding**: the cache's decode policy may cut segments back (:mod:`adakv.decode`).

    ``update`` stores nothing: it returns a :class:`KVHandle`, because only the attention call sees the
    queries and the padding. ``get_seq_length`` is the logical number of tokens seen (padding and evicted
    ones included), so positions stay right. Policies come from the cache's :class:`~adakv.policy.CachePolicy`.
    """

    # No `_layer_type`: setting one would register this class for every DynamicCache.
    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        policy: CachePolicy,
        shared: SharedState,
        check: Callable[[AdaKVLayer, torch.Tensor], None],
        rank: int,
        num_compressed: int,
    ):
        super().__init__()
        self.policy = policy
        self.shared = shared
        self._check = check
        self.rank, self.num_compressed = rank, num_compressed  # index among the cache's compressed layers
        # a cache built from a config has not shown the scorer the model: it checks this layer's module at its
        # first forward (Scorer.check_model) instead of scoring a model it cannot score
        self.module_checked = True
        self._clear()

    def _clear(self) -> None:
        self.store: RaggedKV | None = None
        self.ops = None  # the backend's ops, resolved once from the first tensor's device
        self.seen = 0
        self._n_real: torch.Tensor | None = None  # [B] host int64: real tokens each sequence has seen
        self._decoded = 0  # decoded tokens not yet added to _n_real (a Python int: no tensor op per step)
        # Positions of held rows, kept lazily: rows < pos_count[b, h] are in pos_rows; later rows were appended
        # after the last compaction, in order, so their positions count on from pos_next[b].
        self.pos_rows: torch.Tensor | None = None
        self.pos_count: torch.Tensor | None = None
        self.pos_next: torch.Tensor | None = None
        self.decode_state = None
        self.cascade_scores: torch.Tensor | None = None  # [B, H, rows] scores of held rows (cross-layer only)
        self.context_scores: torch.Tensor | None = None  # [B, H, rows] a context scorer's running scores
        # the scorer's output for the held rows at the last cut ([B, H, rows] per stage), for chunk_scores="max"
        self.held_scores = None

    @property
    def n_real(self) -> torch.Tensor | None:
        """Real (unpadded) tokens each sequence has seen, host int64 ``[B]``."""
        if self._decoded and self._n_real is not None:
            self._n_real = self._n_real + self._decoded
            self._decoded = 0
        return self._n_real

    @n_real.setter
    def n_real(self, value: torch.Tensor | None) -> None:
        self._n_real, self._decoded = value, 0

    # -- the transformers cache-layer interface ------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.ops = backend(self.policy.backend, key_states.device)
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

    @property
    def is_compileable(self) -> bool:
        """With a ``reserve`` a decode step has fixed shapes and no host tensor op (see :meth:`make_room`), so
        transformers' ``generate`` may compile it (as for a StaticCache: on CUDA by default, elsewhere with a
        ``compile_config``). Not with a decode policy: its evictions decide on the host during the step."""
        return self.policy.reserve is not None and self.policy.decode is None

    def make_room(self, q_len: int) -> None:
        """Before a forward of ``q_len`` tokens, outside any compiled code: give every segment the reserve again
        if the tokens would not fit, so that the forward itself takes the fixed-shape path (a re-layout inside a
        compiled step would break its graph). Only with a reserve, and for forwards that fit in one (decoding;
        a longer one is a prompt chunk or grows the storage itself)."""
        if self.policy.reserve is not None and self.store is not None and q_len <= self._slack():
            self.store.make_room(q_len, self._slack())

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()
        self.is_initialized = False
        self.shared.phase.failed = False
        self.shared.phase.unsettled = False  # a scored context is forgotten with the rest

    # -- attending ------------------------------------------------------------------------------------------------
    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        valid: torch.Tensor | None,
        scaling: float,
        softcap: float | None,
        dense: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """Attention output ``[B, Q, H_q, D]`` of ``query`` ``[B, H_q, Q, D]`` whose new tokens' K/V are ``keys``/
        ``values`` ``[B, H_kv, Q, D]``; ``valid`` bool ``[B, Q]`` (None: all real); ``dense()`` is the model's
        own attention over the new tokens alone (used for a first prompt chunk)."""
        try:
            if not self.module_checked:
                self.policy.selection.scorer.check_model(module)
                self.module_checked = True
            return self._attend(module, query, keys, values, valid, scaling, softcap, dense)
        except BaseException:
            # the layers before this one stored their share of the forward, this one may not have: refuse the
            # cache until reset rather than attend over layers that disagree
            self.shared.phase.failed = True
            raise

    def _attend(self, module, query, keys, values, valid, scaling, softcap, dense) -> torch.Tensor:
        if self.shared.phase.mode == "score":
            return self._scoring_pass(module, query, keys, values, valid, scaling, softcap)
        if self.store is None:
            return self._first_chunk(module, query, keys, values, valid, scaling, softcap, dense)
        if self.shared.phase.compressing:
            return self._next_chunk(module, query, keys, values, valid, scaling, softcap)
        # the prompt is over: only a prompt chunk's cut reads the held scores (chunk_scores="max"), so free them
        self.held_scores = None
        # an appended chunk (a question) may be left-padded like a prompt, never right-padded; one read also gives
        # the real-token counts the append needs
        counts = None if valid is None else _real_tokens(valid, None)
        return self._append(module, query, keys, values, valid, scaling, softcap, counts=counts)

    def _first_chunk(self, module, query, keys, values, valid, scaling, softcap, dense) -> torch.Tensor:
        bsz, _, seq, _ = keys.shape
        prefill = self.policy.prefill_attention
        probe = self.shared.phase.lookahead
        if prefill is not None and prefill.applies(module, query.shape[2] - probe, seq - probe):
            if probe:
                # the sparse prefill's segments are aligned to the end of its keys: the chunk's are computed over
                # the chunk alone, as without a probe (a probe would shift them all); the probe's rows, forgotten
                # after the cut, attend densely and causally over the chunk and themselves
                head = slice(None, seq - probe)
                part = None if valid is None else valid[:, head]
                chunk = prefill.attention(
                    module, query[:, :, head], keys[:, :, head], values[:, :, head], part, scaling, softcap
                )
                tail = prefill.dense_attention(query[:, :, head.stop :], keys, values, valid, scaling, softcap)
                out = torch.cat([chunk, tail], 1)
            else:
                out = prefill.attention(module, query, keys, values, valid, scaling, softcap)
        else:
            out = dense()
        self.compress_dense(query, keys, values, valid, scaling, softcap, module)
        return out

    def compress_dense(self, query, keys, values, valid, scaling, softcap, module) -> None:
        """Select and compact this layer's first prompt chunk from its dense K/V ``[B, H, L, D]``; ``valid`` bool
        ``[B, L]`` (None: every token real).

        The host waits for the device at most twice here: for the real-token counts with the padding check (not
        at all without padding) and for the kept counts, which size the storage."""
        if self.ops is None:
            self.lazy_initialization(keys, values)
        bsz, heads, seq, _ = keys.shape
        if valid is None:
            valid = torch.ones(bsz, seq, dtype=torch.bool, device=keys.device)
            counts = torch.full((bsz,), seq, dtype=torch.int64)
        else:
            counts = _real_tokens(valid, None)
        probe = self._forget_probe()
        self.n_real = counts - probe
        positions = (torch.cumsum(valid.long(), -1) - 1).masked_fill(~valid, -1)[:, None].expand(-1, heads, -1)
        positions = self._with_probe_positions(positions, probe)
        valid_heads = valid[:, None].expand(-1, heads, -1)
        # the probe sits at the prompt's last positions, past this chunk: no bound known for it
        n_positions = None if probe else seq
        inputs = self._inputs(query, keys, values, valid_heads, positions, scaling, softcap, module, n_positions, probe)
        if self.shared.phase.mode == "hold":  # a context scorer decides later, from its passes
            choice = Choice(valid_heads.clone())
        else:
            choice = self.policy.selection.select(
                inputs,
                self.n_real,
                self.shared.cascade,
                lookahead=probe,
                n_final=self.shared.phase.final_tokens,
                n_candidates=self.n_real * heads,  # the probe's columns are real (prefill_in_chunks checks)
            )
        self.store = RaggedKV.from_dense(keys, values, choice.keep, slack=self._slack(), ops=self.ops)
        if self.is_compileable:  # a decode step transformers may compile (and capture in CUDA graphs)
            self.store.fix_addresses()
        self._compacted(inputs, choice)

    def _next_chunk(self, module, query, keys, values, valid, scaling, softcap) -> torch.Tensor:
        """A later prompt chunk: attend over what is held plus the chunk, then cut every segment back to its
        allocation of all the tokens seen so far."""
        counts = None if valid is None else _real_tokens(valid, self.n_real)
        out = self._append(module, query, keys, values, valid, scaling, softcap, observe=False, counts=counts)
        if self.shared.phase.mode == "hold":  # a context scorer decides later, from its passes
            return out
        store = self.store
        k_view, inside = store.view(store.keys)
        v_view, _ = store.view(store.values)
        probe = self._forget_probe()
        positions = self._with_probe_positions(self._positions(view=True), probe)
        n_positions = None if probe else self.seen
        inputs = self._inputs(query, k_view, v_view, inside, positions, scaling, softcap, module, n_positions, probe)
        if probe:
            self.n_real = self.n_real - probe
        scores = fresh = None
        earlier = self._held_view(k_view.shape[2])
        if earlier is not None:  # chunk_scores="max": a held token keeps the best score it has had
            fresh = self.policy.selection.scorer(inputs)
            scores = map_scores(lambda new, old: torch.fmax(new.float(), old), fresh, earlier)  # NaN does not stick
        choice = self.policy.selection.select(
            inputs,
            self.n_real,
            self.shared.cascade,
            scores=scores,
            n_candidates=store.lengths().sum(-1) - probe * store.shape[1],  # every head holds the real probe
            lookahead=probe,
            n_final=self.shared.phase.final_tokens,
        )
        if fresh is not None and choice.raw is not None:  # a decode policy starts from this cut's own scores
            choice.raw = raw_scores(fresh)
        store.replace(k_view, v_view, choice.keep)  # the probe is never kept: its rows go here
        self._compacted(inputs, choice, earlier)
        return out

    def _held_view(self, width: int):
        """``held_scores`` (chunk_scores="max") in the view layout of the current store, -inf for rows without
        one; None when there are none."""
        if self.held_scores is None:
            return None
        return map_scores(lambda t: self.store.rows_to_view(t, float("-inf"), width), self.held_scores)

    def _with_probe_positions(self, positions: torch.Tensor, probe: int) -> torch.Tensor:
        """``positions`` ``[B, H, L]`` (right-aligned) with the last ``probe`` columns at the probe tokens' own
        positions (the prompt's last ones, where the model rotated them), not after the chunk."""
        if not probe:
            return positions
        own = self.shared.phase.probe_positions.to(positions.device)[:, None, :].expand(-1, positions.shape[1], -1)
        return torch.cat([positions[..., :-probe], own], -1)

    def _forget_probe(self) -> int:
        """Tokens at the end of this prompt chunk that are a lookahead probe (:func:`adakv.prefill_in_chunks`):
        they are attended and scored with like the rest, then dropped, so they do not count as seen."""
        probe = self.shared.phase.lookahead
        self.seen -= probe
        return probe

    def _append(
        self, module, query, keys, values, valid, scaling, softcap, observe: bool = True, counts=None
    ) -> torch.Tensor:
        """Append and attend; ``counts``: ``valid``'s real tokens per sequence on the host, when already read."""
        store = self.store
        bsz, h_q, q_len, dim = query.shape
        h_kv = keys.shape[1]
        if valid is not None and counts is None:
            (counts,) = host.to_host(valid.sum(-1))
        if valid is not None and bool((counts == q_len).all()):
            valid = None
        self.cascade_scores = None  # they describe the rows of the last prompt chunk only
        q = query.reshape(bsz, h_kv, h_q // h_kv, q_len, dim)
        static = self.policy.reserve is not None
        if (
            self.ops.decode_ is not None
            and valid is None
            and q_len == 1
            and h_q // h_kv <= self.ops.decode_group_limit
            and store.has_room(1)
        ):
            # one decoded token: append, attend and advance the lengths in the backend's single launch
            width = store.width if static else store.max_length() + 1
            out = store.decode(q, keys, values, scaling, softcap, width)
            self._decoded += 1
            if observe and self.decode_state is not None:
                self.decode_state.after_append(self, module, q, scaling, softcap, None, None)
            return out.reshape(bsz, h_q, q_len, dim).transpose(1, 2).contiguous()
        store.append(keys, values, valid, None if valid is None else counts)
        if valid is None:
            self._decoded += q_len
        else:
            self.n_real = self.n_real + counts
        hidden = None
        if valid is not None:
            count = torch.cumsum(valid.long(), -1)
            hidden = count[:, -1:] - count  # valid new tokens after query i, invisible to it
        if static and (q_len == 1 or torch.compiler.is_compiling()) and store.max_length() <= store.width:
            # fixed width (the widest segment's capacity) and device metadata only: traceable, capturable
            out = self.ops.ragged_attention_static(
                q, store.keys, store.values, store.start, store.length, scaling, softcap, hidden, store.width
            )
        else:
            starts, lengths = store.host_segments()  # the torch backend loops on them; Triton reads the tensors
            out = self.ops.ragged_attention(
                q,
                store.keys,
                store.values,
                store.start,
                store.length,
                scaling,
                softcap,
                hidden,
                store.max_length(),
                host_start=starts,
                host_length=lengths,
            )
        if observe and self.decode_state is not None:
            self.decode_state.after_append(self, module, q, scaling, softcap, hidden, valid)
        return out.reshape(bsz, h_q, q_len, dim).transpose(1, 2).contiguous()

    # -- context scorers (KVzip): scoring passes, then one selection -------------------------------------------------
    def _scoring_pass(self, module, query, keys, values, valid, scaling, softcap) -> torch.Tensor:
        """Attend as usual over the held context plus the pass's tokens, show the scorer what this layer saw,
        then forget the pass's tokens."""
        store = self.store
        before, real_before = store.lengths(), self.n_real.clone()
        # The context is held whole, so every head of a sequence holds the same rows: the pass's attention is then
        # dense attention over the rows gathered below for the scorer (sdpa: about 2x the ragged kernel on CPU).
        dense = softcap is None and bool((before == before[:, :1]).all())
        if dense:
            store.append(keys, values, None if valid is None or bool(valid.all()) else valid)
        else:
            out = self._append(module, query, keys, values, valid, scaling, softcap, observe=False)
        bsz, h_q, q_len, dim = query.shape
        heads = store.shape[1]
        q = query.reshape(bsz, heads, h_q // heads, q_len, dim)
        k_rows, v_rows, positions = self._rows(store.keys), self._rows(store.values), self._positions(view=False)
        if valid is None:
            valid = torch.ones(bsz, q_len, dtype=torch.bool, device=query.device)
        count = torch.cumsum(valid.long(), -1)
        hidden = count[:, -1:] - count  # the pass's valid tokens after query i
        offs = torch.arange(k_rows.shape[2], device=query.device)
        visible = offs < (store.length[:, :, None] - hidden[:, None, :])[..., None]  # [B, H, Q, M]
        if dense:  # in blocks of queries: sdpa with a mask may materialize the [Q, M] weights on CPU
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(
                        query[:, :, lo : lo + PASS_BLOCK],
                        k_rows,
                        v_rows,
                        attn_mask=visible[:, :1, lo : lo + PASS_BLOCK],
                        scale=scaling,
                        enable_gqa=True,
                    )
                    for lo in range(0, q_len, PASS_BLOCK)
                ],
                2,
            )
            out = out.transpose(1, 2).contiguous()
        phase = self.shared.phase
        seen = PassAttention(
            q=q,
            keys=k_rows,
            values=v_rows,
            positions=positions,
            context_rows=before.to(query.device),
            context_width=int(before.max()),  # host counts: no device read
            visible=visible,
            query_valid=valid,
            span=phase.scoring,
            hidden_states=phase.hidden.pop(id(module), None),  # freed once used
            module=module,
            scaling=scaling,
            softcap=softcap,
        )
        self.context_scores = self.policy.selection.scorer.observe(seen, self.context_scores)
        store.truncate(before)
        self.n_real = real_before
        return out

    def _rows(self, buffer: torch.Tensor) -> torch.Tensor:
        """``buffer``'s segments in row order ``[B, H, M, ...]`` (zeros past a segment's end)."""
        store = self.store
        width = store.max_length()
        offs = torch.arange(width, device=store.start.device)
        inside = offs < store.length[..., None]
        idx = (store.start[..., None] + offs).clamp_(max=max(buffer.shape[0] - 1, 0))
        return buffer[idx].masked_fill(~inside[..., None], 0)

    def context_ranking(self, module: nn.Module):
        """After the scoring passes: this layer's candidates (its held context, as a view) and their ranking."""
        store = self.store
        k_view, inside = store.view(store.keys)
        v_view, _ = store.view(store.values)
        bsz, heads, _, dim = k_view.shape
        group = module.o_proj.in_features // (heads * dim)  # query heads per KV head, for value-aware finalizers
        query = k_view.new_zeros(bsz, heads * group, 0, dim)
        positions = self._positions(view=True)
        inputs = self._inputs(query, k_view, v_view, inside, positions, 1.0, None, module, self.seen)
        scores = store.rows_to_view(self.context_scores, 0.0, k_view.shape[2])
        scorer = self.policy.selection.scorer
        return inputs, scorer.finalize(scores, inputs)

    def settle_context(self, inputs: ScoreInputs, choice: Choice) -> None:
        """Compact the held context with ``choice`` (over ``inputs``' view) once every pass was observed."""
        self.store.replace(inputs.keys, inputs.values, choice.keep)
        self.context_scores = None
        self._compacted(inputs, choice)

    # -- evicting -------------------------------------------------------------------------------------------------
    def _slack(self) -> int:
        reserve = self.policy.reserve
        return MIN_SLACK if reserve is None else max(MIN_SLACK, reserve)

    def _inputs(
        self, query, keys, values, valid, positions, scaling, softcap, module, n_positions, lookahead=0
    ) -> ScoreInputs:
        window = self.policy.selection.window
        return ScoreInputs(
            query,
            keys,
            values,
            valid,
            window,
            scaling,
            softcap,
            module,
            self.rank,
            self.num_compressed,
            positions,
            n_positions,
            lookahead,
        )

    def _compacted(self, inputs: ScoreInputs, choice: Choice, earlier=None, decoding: bool = False) -> None:
        """Bookkeeping after the storage was rebuilt from ``inputs``' candidates with ``choice.keep``;
        ``earlier``: the held tokens' previous ``held_scores`` in ``inputs``' layout (see :meth:`_held_view`);
        ``decoding``: a decode-time re-selection (no held scores are kept for it)."""
        keep = choice.keep
        width = self.store.max_length()  # the store was just laid out from keep: its host counts are keep's
        self.pos_rows = pack_kept(inputs.positions, keep, fill=-1, width=width)
        self.pos_count = self.store.lengths()
        self.pos_next = self.n_real.clone()
        if self.shared.cascade is not None:
            self.cascade_scores = pack_kept(choice.ranked, keep, width=width) if choice.ranked is not None else None
        if self.policy.decode is not None:
            self.decode_state = self.policy.decode.start(self, inputs, choice, self.decode_state)
        # a choice without scores kept every candidate: the held rows stay in order, their earlier scores apply
        if decoding:
            self.held_scores = None  # no prompt chunk's cut will read them
        elif self.policy.chunk_scores == "max" and choice.scores is not None:
            scores = choice.scores
            if choice.whole is not None and bool(choice.whole.any()):
                # a sequence that kept everything was not cut: as alone in its batch, it keeps its earlier scores
                whole = host.to_device(choice.whole, keep.device)[:, None, None]
                if earlier is None:
                    scores = map_scores(lambda t: t.float().masked_fill(whole, float("-inf")), scores)
                else:
                    scores = map_scores(lambda t, e: torch.where(whole, e, t.float()), scores, earlier)
            self.held_scores = map_scores(lambda t: pack_kept(t.detach().float(), keep, width=width), scores)

    def reselect(
        self,
        queries: torch.Tensor,
        module: nn.Module,
        scaling: float,
        softcap: float | None,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Re-score the held tokens from ``queries`` ``[B, H_q, Q, D]`` (the most recent ones) and cut every
        segment back to its allocation of the tokens seen so far (decode-time re-selection). ``rows``: bool ``[B]``
        (host), the sequences to cut (None: all); the others keep every token they hold."""
        store = self.store
        k_view, inside = store.view(store.keys)
        v_view, _ = store.view(store.values)
        positions = self._positions(view=True)
        # the queries are each sequence's most recent tokens, and a scorer reads query i at column L - Q + i
        # (ScoreInputs): score with as many as every head still holds as its last columns (a budget under the window
        # plus the scorer's sinks holds fewer recent tokens than the window: the sinks would take those columns)
        last = positions.amax(-1, keepdim=True)
        held = int(((positions > last - queries.shape[2]) & (positions >= 0)).sum(-1).min())  # one host read
        q_len = max(1, min(queries.shape[2], k_view.shape[2], held))
        inputs = self._inputs(
            queries[:, :, -q_len:], k_view, v_view, inside, positions, scaling, softcap, module, self.seen
        )
        choice = self.policy.selection.select(inputs, self.n_real, None, n_candidates=store.lengths().sum(-1))
        if rows is not None:
            cut = host.to_device(rows, inside.device)[:, None, None]
            choice = dataclasses.replace(choice, keep=torch.where(cut, choice.keep, inside))
        if bool((choice.keep == inside).all()):
            return
        store.replace(k_view, v_view, choice.keep)
        self._compacted(inputs, choice, decoding=True)

    def evict_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows where ``keep`` ``[B, H, M]`` (row order, over each segment's rows) is True."""
        positions = self._positions(view=False)
        keep = keep[..., : positions.shape[-1]] & (positions >= 0)
        self.store.retain(keep)
        self.pos_rows = pack_kept(positions, keep, fill=-1)
        self.pos_count = keep.sum(-1).to("cpu", torch.int64)
        self.pos_next = self.n_real.clone()
        if self.cascade_scores is not None:
            self.cascade_scores = pack_kept(self.cascade_scores[..., : keep.shape[-1]], keep)
        if self.held_scores is not None:  # rows appended since the last cut have no earlier score
            width = keep.shape[-1]
            held = lambda t: pack_kept(fit_width(t, width, float("-inf")), keep)  # noqa: E731
            self.held_scores = map_scores(held, self.held_scores)

    def cascade_mark(self, keep: torch.Tensor) -> torch.Tensor:
        """The cascade took tokens from this layer: mark them (rows outside ``keep`` go at the next
        :meth:`cascade_settle`); returns the rows still held, a device scalar (see :mod:`adakv.cascade`)."""
        self.cascade_scores = self.cascade_scores.masked_fill(~keep, float("-inf"))
        return (self.cascade_scores > float("-inf")).sum()

    def cascade_settle(self) -> None:
        """Re-lay out with only the rows the cascade left this layer."""
        held = self.cascade_scores > float("-inf")
        self.evict_rows(held)
        if self.decode_state is not None:  # started from this layer's own cut, before the cascade's
            self.decode_state.rows_kept(self, held)

    def _positions(self, view: bool) -> torch.Tensor:
        """Positions of the held tokens ``[B, H, M]`` (-1 past a segment's end): in row order, or right-aligned
        like :meth:`RaggedKV.view`."""
        store = self.store
        width = store.max_length()
        device = store.start.device
        offs = torch.arange(width, device=device)
        count = self.pos_count.to(device)[..., None]
        known = fit_width(self.pos_rows, width, -1)
        later = self.pos_next.to(device)[:, None, None] + offs - count
        length = store.length[..., None]
        rows = torch.where(offs < count, known, later).masked_fill(offs >= length, -1)
        return store.rows_to_view(rows, -1, width) if view else rows

    # -- batch manipulation (beam search, contrastive search, num_return_sequences) --------------------------------
    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.store is None:
            return
        index = torch.as_tensor(indices, dtype=torch.long)
        host = index.to("cpu")
        self.store.select_batch(index)
        self.n_real, self.pos_count, self.pos_next = self.n_real[host], self.pos_count[host], self.pos_next[host]
        self.pos_rows = self.pos_rows[index.to(self.pos_rows.device)]
        if self.cascade_scores is not None:
            self.cascade_scores = self.cascade_scores[index.to(self.cascade_scores.device)]
        if self.context_scores is not None:  # a scored cache not settled yet
            self.context_scores = self.context_scores[index.to(self.context_scores.device)]
        if self.held_scores is not None:
            self.held_scores = map_scores(lambda t: t[index.to(t.device)], self.held_scores)
        if self.decode_state is not None:
            self.decode_state.select_batch(index)

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


def _real_tokens(valid: torch.Tensor, n_real: torch.Tensor | None) -> torch.Tensor:
    """The real tokens of each sequence in ``valid`` ``[B, L]`` (host int64 ``[B]``), read in one transfer with the
    check that padding comes first: no 0 after a real token, in this chunk or after the ``n_real`` earlier ones."""
    bad = (valid[:, 1:] < valid[:, :-1]).any()
    if n_real is not None:
        bad = bad | ((host.to_device(n_real, valid.device) > 0) & ~valid.all(-1)).any()
    counts, bad = host.to_host(valid.sum(-1), bad)
    if bool(bad):
        raise ValueError(
            "AdaKVCache needs left padding, but the attention mask has a 0 after a real token. Set "
            "tokenizer.padding_side = 'left'. If the prompt contains the pad token (e.g. a chat turn end), pass "
            "attention_mask explicitly: generate() otherwise marks every pad-token id as padding."
        )
    return counts
