"""KVzip: query-agnostic scores from a context-reconstruction pass (and KVzip+'s normalization)."""

from __future__ import annotations

import torch
from torch import nn

from .base import ContextScorer, PassAttention, ScoreInputs, ScoringPass
from .criticalkv import check_output_projections
from .defensivekv import floor_at_mean, head_share_of_value, pool_rows

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
# Elements of one block of pass logits ([B, H, G, q, M]); bounds the scorer's extra memory.
BLOCK_ELEMENTS = 1 << 22
POOL_KERNEL = 5  # KVzip-Defensive's row pooling, DefensiveKV's default kernel


class KVzip(ContextScorer):
    """KVzip: keep the KV pairs the model needs to *reconstruct* the context.

    Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
    NeurIPS 2025 (arXiv:2505.23416; code github.com/snu-mllab/KVzip).

    After the context, the model is teacher-forced to repeat it, chunk by chunk (``chunk_size``
    tokens, 2000 as in the official code): the input of chunk c is the prompt "Repeat the previous
    context exactly." (for c > 0: "Repeat the part of the previous context exactly, starting with"
    followed by the previous chunk's last ``overlap`` = 8 tokens), the chat template's assistant
    header, then the chunk's tokens. Every KV head scores the context tokens of the chunk by the
    maximum attention they receive from the chunk's queries, over the queries and the G query heads
    of its group:

        s_hj = max over t in the pass, g in the group of softmax_j(q_gt K^T / sqrt(d))

    with the softmax over the ``sinks`` first tokens, the chunk's context tokens and the pass's own
    tokens (causal), as in the official code. The first ``sinks`` tokens are always kept. The official
    default allocation is one budget over all layers x heads x tokens (preset ``kvzip``: the
    layer-adaptive allocator, applied once all layers are scored, not cascading).

    KVzip+ (``normalize=True``; from kvpress / KVzap, arXiv:2601.07891) weighs each attention by how far
    the token's value moves the output relative to the query's input: a_gtj * ||W_O^(g) v_j||_2 / ||h_t||_2
    before the max (h_t: the attention module's input hidden state of query t).

    KVzip-Defensive (``defensive=True``, preset ``kvzip-defensive``; tried here, not a published method) adds
    DefensiveKV's safeguards (arXiv:2510.13334) to the reconstruction scores: each pass query's attention row
    is average-pooled over the context (kernel 5, mass kept) before the max, the per-head scores are raised to
    at least their mean over the context (prior correction), and multiplied by the value term N_hj / sum_h' N_h'j
    (N_hj = mean over the group of ||v_j W_O^(g)||_1).

    Deviations: the official code keeps its whole system prompt, kvpress the first 4 tokens; here
    ``sinks`` (4) tokens, and the cache's observation window (its last ``window`` tokens) is kept too.
    The softmax runs in fp32 (the official code in the model's dtype). Pass prompts are tokenized
    piece by piece without special tokens and joined as ids, as in the official code; the assistant
    header comes from the tokenizer's chat template (kvpress's approach; the official code writes
    templates by hand), "\\n" without one. The continuation prompt ends at "starting with" (kvpress; the
    official code has a trailing space, one more token). In a left-padded batch the reconstruction chunks
    are cut in padded index space, so a padded sequence's chunk boundaries shift by its padding (the official
    code runs batch 1); contexts within one chunk (``chunk_size``, 2000) are unaffected.

    Cost: the passes together are about one more prefill of the context (they attend over the whole
    held context); compression happens once after them, through :func:`adakv.compress_context`.
    """

    name = "kvzip"

    def __init__(
        self,
        chunk_size: int = 2000,
        sinks: int = 4,
        overlap: int = 8,
        normalize: bool = False,
        defensive: bool = False,
    ):
        for label, value, low in (("chunk_size", chunk_size, 1), ("sinks", sinks, 0), ("overlap", overlap, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"KVzip {label} must be an int >= {low}, got {value!r}.")
        for label, flag in (("normalize", normalize), ("defensive", defensive)):
            if not isinstance(flag, bool):
                raise TypeError(f"KVzip {label} must be True or False, got {flag!r}.")
        self.chunk_size = chunk_size
        self.sinks = sinks
        self.overlap = overlap
        self.normalize = normalize
        self.defensive = defensive

    @property
    def pinned_positions(self) -> int:
        return self.sinks

    @property
    def uses_hidden_states(self) -> bool:
        return self.normalize

    # -- the passes ----------------------------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        # every variant reads o_proj: the query group of a layer, and kvzip+'s and kvzip-defensive's value terms
        check_output_projections(model)

    def passes(self, context_ids: torch.Tensor, context_mask: torch.Tensor, tokenizer) -> list[ScoringPass]:
        if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
            raise ValueError("KVzip builds its reconstruction prompt with the model's tokenizer: pass tokenizer=.")
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        first, following, header = encode(FIRST_PROMPT), encode(NEXT_PROMPT), encode(_assistant_header(tokenizer))
        bsz, length = context_ids.shape
        pad = length - context_mask.sum(-1)
        out = []
        for lo in range(0, length, self.chunk_size):
            hi = min(lo + self.chunk_size, length)
            if not bool(context_mask[:, lo:hi].any()):
                continue  # padding for every sequence
            prompt = torch.tensor(first if lo == 0 else following, dtype=context_ids.dtype)
            prompt = prompt.to(context_ids.device).expand(bsz, -1)
            pieces = [prompt]
            masks = [torch.ones_like(prompt)]
            if lo > 0 and self.overlap:
                pieces.append(context_ids[:, max(lo - self.overlap, 0) : lo])
                masks.append(context_mask[:, max(lo - self.overlap, 0) : lo])
            tail = torch.tensor(header, dtype=context_ids.dtype, device=context_ids.device).expand(bsz, -1)
            pieces += [tail, context_ids[:, lo:hi]]
            masks += [torch.ones_like(tail), context_mask[:, lo:hi]]
            start = (torch.full_like(pad, lo) - pad).clamp(min=0)
            out.append(ScoringPass(torch.cat(pieces, -1), torch.cat(masks, -1).long(), start, hi - pad))
        return out

    # -- scoring ------------------------------------------------------------------------------------------------
    def observe(self, seen: PassAttention, scores: torch.Tensor | None) -> torch.Tensor:
        q, keys, pos = seen.q, seen.keys.float(), seen.positions
        bsz, heads, group, q_len, dim = q.shape
        rows = keys.shape[2]
        offs = torch.arange(rows, device=q.device)
        own = offs >= seen.context_rows[..., None]  # [B, H, M]
        start = seen.span.span_start.to(q.device)[:, None, None]
        end = seen.span.span_end.to(q.device)[:, None, None]
        in_span = (pos >= start) & (pos < end) & ~own
        sink = (pos >= 0) & (pos < self.sinks) & ~own
        columns = own | in_span | sink
        weight = self._value_norms(seen) if self.normalize else None  # [B, H, G, M]
        hidden_norm = seen.hidden_states.float().norm(dim=-1) if self.normalize else None  # [B, Q]
        context = seen.context_width
        best = torch.zeros(bsz, heads, context, dtype=torch.float32, device=q.device)
        block = max(1, BLOCK_ELEMENTS // max(1, bsz * heads * group * rows))
        span = in_span[..., :context]
        # per-query factor on the probabilities: 0 for the pass's padding (whose rows are left unmasked, so the
        # softmax has no all -inf row), 1 / ||h_t|| for KVzip+ (applied even when all ones: testing that would
        # make the host wait for the device at every layer)
        factor = seen.query_valid.float()
        if hidden_norm is not None:
            factor = factor / hidden_norm.clamp_min(1e-6)
        # One pass per op over the big [B, H, G, q, M] block: logits, an additive 0/-inf mask, one fused softmax,
        # the per-query factor on the context columns, the max over queries; the rest runs on [B, H, G, context].
        for lo in range(0, q_len, block):
            hi = min(q_len, lo + block)
            width = min(rows, context + hi)  # the pass's own rows after query hi - 1 are invisible to this block
            logits = torch.einsum("bhgqd,bhmd->bhgqm", q[:, :, :, lo:hi].float(), keys[:, :, :width])
            logits.mul_(seen.scaling)
            if seen.softcap is not None:
                logits = torch.tanh(logits / seen.softcap) * seen.softcap
            allow = seen.visible[:, :, lo:hi, :width] & columns[:, :, None, :width]
            allow |= ~seen.query_valid[:, None, lo:hi, None]
            bias = torch.zeros(allow.shape, dtype=torch.float32, device=q.device).masked_fill_(~allow, float("-inf"))
            probs = logits.add_(bias[:, :, None]).softmax(-1)[..., :context]
            probs = probs * factor[:, None, None, lo:hi, None]
            if self.defensive:  # the rows themselves are pooled over the span
                if weight is not None:
                    probs = probs * weight[:, :, :, None, :context]
                keep = span[:, :, None, None, :]
                probs = pool_rows(probs.masked_fill(~keep, 0.0), keep, POOL_KERNEL, pos[..., :context])
                top = probs.amax(dim=(2, 3))
            else:
                top = probs.amax(dim=3)  # [B, H, G, context]
                if weight is not None:  # KVzip+: max_t p_tj w_gj / ||h_t|| = w_gj max_t (p_tj / ||h_t||)
                    top = top * weight[..., :context]
                top = top.amax(dim=2)
            best = torch.maximum(best, top.masked_fill_(~span, 0.0))
        if scores is None:
            return best
        width = max(scores.shape[-1], context)
        grow = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1]))  # noqa: E731
        return torch.maximum(grow(scores), grow(best))

    def _value_norms(self, seen: PassAttention) -> torch.Tensor:
        """||W_O^(g) v_j||_2 for every row j and query head g of each group, ``[B, H, G, M]``, via W_O^(g)'s Gram."""
        weight = seen.module.o_proj.weight.float()  # [hidden, H_q * D]
        bsz, heads, group, _, dim = seen.q.shape
        w = weight.reshape(weight.shape[0], heads, group, dim)
        gram = torch.einsum("ohgd,ohge->hgde", w, w)
        values = seen.values.float()
        squared = torch.einsum("bhmd,hgde,bhme->bhgm", values, gram, values)
        return squared.clamp_min(0).sqrt()

    def finalize(self, scores: torch.Tensor, inputs: ScoreInputs) -> torch.Tensor:
        if self.defensive:
            scores = floor_at_mean(scores, inputs.valid) * head_share_of_value(inputs)
        sink = (inputs.positions >= 0) & (inputs.positions < self.sinks)
        return scores.masked_fill(sink, float("inf"))


def _assistant_header(tokenizer) -> str:
    """What the chat template puts between a user message and the assistant's answer ("\\n" without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n"
    marker = "@@adakv-marker@@"
    # enable_thinking=False: a thinking model's (Qwen3) answer opens with an empty think block, as in KVzip's and
    # kvpress's templates; other templates ignore the variable
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    return text[text.index(marker) + len(marker) :]
