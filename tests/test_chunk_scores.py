"""AdaKVCache(chunk_scores=...): how held tokens are scored when a later prompt chunk cuts the cache back."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from test_matrix import BUDGET as BUDGET_MATRIX
from test_matrix import MODEL, PAD, _check
from test_matrix import SEQ as SEQ_MATRIX
from test_matrix import WINDOW as WINDOW_MATRIX
from tiny_models import ToyTokenizer, padded_batch, tiny_model

from adakv import METHODS, AdaKVCache, ContextScorer, Scorer, compress_context, prefill_in_chunks, with_cache
from adakv.eval.cli import main as bench
from adakv.layer import AdaKVLayer
from adakv.prompt import chunk_bounds
from adakv.scorers import SnapKV, StagedScores

pytestmark = pytest.mark.fast
BUDGET, WINDOW, CHUNK, SEQ = 0.25, 4, 30, 110


class TableScorer(Scorer):
    """Scores drawn afresh at every cut: cut c of layer l scores position p from a random table seeded by (l, c)."""

    name = "table"

    def __init__(self):
        self.cuts: dict[int, int] = defaultdict(int)

    @staticmethod
    def table(layer: int, cut: int, shape: tuple[int, int]) -> torch.Tensor:
        return torch.rand(*shape, SEQ, generator=torch.Generator().manual_seed(1000 * layer + cut))

    def __call__(self, inputs):
        cut = self.cuts[inputs.layer]
        self.cuts[inputs.layer] += 1
        pos = inputs.positions
        table = self.table(inputs.layer, cut, tuple(pos.shape[:2]))
        return table.gather(-1, pos.clamp(min=0)).masked_fill(pos < 0, float("-inf"))


def _simulate(layer: int, b: int, h: int, heads: int, mode: str) -> list[int]:
    """The positions one head keeps after the last chunk, cut by cut, in plain Python."""
    held: dict[int, float] = {}
    for cut, (lo, hi) in enumerate(chunk_bounds(SEQ, CHUNK, WINDOW)):
        table = TableScorer.table(layer, cut, (2, heads))[b, h]
        score = {p: float(table[p]) for p in [*held, *range(lo, hi)]}
        if mode == "max":
            score.update({p: max(score[p], s) for p, s in held.items()})
        per_head = int(hi * BUDGET + 0.5)
        protected = sorted(score)[-min(WINDOW, per_head) :]  # the newest tokens: the observation window
        rest = sorted((p for p in score if p not in protected), key=score.get, reverse=True)
        held = {p: score[p] for p in [*protected, *rest[: per_head - len(protected)]]}
    return sorted(held)


@pytest.mark.parametrize("mode", ["latest", "max"])
def test_each_cut_keeps_the_top_of_the_latest_or_the_best_scores(mode):
    """Uniform allocator, no lookahead, batch 2: after every cut each head holds exactly what a plain simulation
    keeps, with ``"max"`` a held token scored by the best of its new score and the one it was kept with."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    cache = AdaKVCache(model, BUDGET, scorer=TableScorer(), allocator="uniform", window=WINDOW, chunk_scores=mode)
    prefill_in_chunks(model, cache, ids, CHUNK, lookahead=False)
    heads = model.config.num_key_value_heads
    layers = [layer for layer in cache.layers if isinstance(layer, AdaKVLayer)]
    for rank, layer in enumerate(layers):
        rows = layer._positions(view=False)
        for b in range(2):
            for h in range(heads):
                got = rows[b, h][rows[b, h] >= 0].tolist()
                assert got == _simulate(rank, b, h, heads, mode), (rank, b, h)


@pytest.mark.parametrize("allocator", ["uniform", "adakv", "layer-adaptive"])
def test_held_scores_are_the_best_score_since_arrival(allocator):
    """Left-padded batch 2, the lookahead probe, allocators that give heads different lengths (and a cascade that
    evicts earlier layers' rows): after the prompt, each held row's score is the max of the table's scores of its
    position over the cuts since its chunk came in, so the scores are lined up with the right-aligned rows."""
    model = tiny_model("llama", num_hidden_layers=3)
    ids, mask = padded_batch(seq_len=SEQ, pad=9, seed=5)
    cache = AdaKVCache(model, BUDGET, scorer=TableScorer(), allocator=allocator, window=WINDOW, chunk_scores="max")
    prefill_in_chunks(model, cache, ids, CHUNK, attention_mask=mask)
    bounds = chunk_bounds(SEQ, CHUNK, WINDOW)
    pad = (mask == 0).sum(-1)
    heads = model.config.num_key_value_heads
    layers = [layer for layer in cache.layers if isinstance(layer, AdaKVLayer)]
    for rank, layer in enumerate(layers):
        tables = torch.stack([TableScorer.table(rank, cut, (2, heads)) for cut in range(len(bounds))])
        rows, held = layer._positions(view=False), layer.held_scores
        for b in range(2):
            for h in range(heads):
                for r, p in enumerate(rows[b, h].tolist()):
                    if p < 0:
                        continue
                    arrival = next(c for c, (lo, hi) in enumerate(bounds) if lo <= p + int(pad[b]) < hi)
                    expected = tables[arrival:, b, h, p].max()
                    torch.testing.assert_close(held[b, h, r], expected, msg=f"layer {rank} b {b} h {h} pos {p}")


def test_the_two_modes_differ_and_a_one_shot_prompt_is_the_same():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))

    def kept(mode: str, chunk: int | None) -> list[torch.Tensor]:
        cache = AdaKVCache(model, BUDGET, scorer=TableScorer(), allocator="uniform", window=WINDOW, chunk_scores=mode)
        if chunk is None:
            with torch.no_grad():
                model(ids, **with_cache(cache))
        else:
            prefill_in_chunks(model, cache, ids, chunk, lookahead=False)
        return [layer._positions(view=False) for layer in cache.layers]

    assert any(not torch.equal(a, b) for a, b in zip(kept("latest", CHUNK), kept("max", CHUNK)))
    assert all(torch.equal(a, b) for a, b in zip(kept("latest", None), kept("max", None)))


def _held_scores_lined_up(layers: list[AdaKVLayer]) -> None:
    """One held score per held row (never -inf: padding is never held), -inf after each segment's end."""
    for layer in layers:
        held = layer.held_scores
        if layer.store is None or held is None:
            continue
        for t in (held.first, held.second) if isinstance(held, StagedScores) else (held,):
            assert ((t > float("-inf")).sum(-1) == layer.kept_lengths().to(t.device)).all(), layer.rank


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_preset_keeps_its_budget_with_the_best_scores(method, monkeypatch):
    """Every preset (staged scorers, cross-layer cascades that evict earlier layers' rows, context scorers) runs
    chunked with ``"max"``, batch 2 with left padding and the lookahead: budget kept, padding and probe never held,
    and after every layer's cut every layer's held scores are lined up with its held rows."""
    ids, mask = padded_batch(seq_len=SEQ_MATRIX, pad=PAD)
    cache = AdaKVCache(MODEL, BUDGET_MATRIX, method=method, window=WINDOW_MATRIX, chunk_scores="max")
    layers = [layer for layer in cache.layers if isinstance(layer, AdaKVLayer)]
    next_chunk = AdaKVLayer._next_chunk
    cuts = []

    def checked(self, *args):
        out = next_chunk(self, *args)
        _held_scores_lined_up(layers)
        cuts.append(self.rank)
        return out

    monkeypatch.setattr(AdaKVLayer, "_next_chunk", checked)
    if isinstance(cache.selection.scorer, ContextScorer):  # one cut, after the passes
        compress_context(MODEL, cache, ids, attention_mask=mask, tokenizer=ToyTokenizer(), chunk_size=24)
    else:
        prefill_in_chunks(MODEL, cache, ids, 24, attention_mask=mask)
        assert len(cuts) == 2 * len(layers)
    _check(cache, mask)  # test_matrix's invariants: each allocator's totals, window, no padding, kv_bytes
    assert all(layer.held_scores is not None for layer in layers)
    _held_scores_lined_up(layers)


def test_batch_reordering_moves_the_held_scores():
    """A cache filled with the batch reversed, chunk by chunk, equals one filled in order and reordered after the
    first chunk: the held scores of the later cuts follow their sequences."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 90), generator=torch.Generator().manual_seed(4))
    kwargs = dict(budget=0.25, window=WINDOW, method="defensivekv", chunk_scores="max")
    forward, backward = AdaKVCache(model, **kwargs), AdaKVCache(model, **kwargs)
    with torch.no_grad():
        with forward.compressing():
            model(ids[:, :30], **with_cache(forward))
        forward.batch_select_indices(torch.tensor([1, 0]))
        with forward.compressing():
            model(ids.flip(0)[:, 30:], **with_cache(forward))
        with backward.compressing():
            model(ids.flip(0)[:, :30], **with_cache(backward))
            model(ids.flip(0)[:, 30:], **with_cache(backward))
    for mine, theirs in zip(forward.layers, backward.layers):
        assert torch.equal(mine._positions(view=False), theirs._positions(view=False))
        torch.testing.assert_close(mine.held_scores, theirs.held_scores)


def test_chunk_scores_errors(tmp_path, capsys):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="chunk_scores must be one of"):
        AdaKVCache(model, 0.2, chunk_scores="mean")
    for flags in (["--chunk-scores", "max"], ["--hold-final"], ["--no-lookahead"]):
        with pytest.raises(SystemExit):  # no --prefill-chunk-size
            bench(["quality", "--model", "smollm2", "--samples", "1", "--out", str(tmp_path), *flags])
        assert "only apply to a chunked prefill" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["latest", "max"])
def test_a_sequence_keeps_the_same_tokens_alone_or_in_a_batch(mode):
    """With an int budget, the second (left-padded) sequence keeps everything at the first cut while the first is
    cut: the first sequence's held tokens must not depend on that (with "max", the uncut sequence used to store
    scores it would not have had alone, and rank its next cut by them)."""
    model = tiny_model("llama").double()
    ids, mask = padded_batch(seq_len=60, pad=9)
    kwargs = dict(window=4, scorer=SnapKV(kernel_size=1), allocator="uniform", chunk_scores=mode)
    both, alone = AdaKVCache(model, 16, **kwargs), AdaKVCache(model, 16, **kwargs)
    prefill_in_chunks(model, both, ids, 24, attention_mask=mask, lookahead=False)
    prefill_in_chunks(model, alone, ids[:1], 24, attention_mask=mask[:1], lookahead=False)
    held = lambda layer: [[int(p) for p in seg if p >= 0] for seg in layer._positions(view=False)[0]]  # noqa: E731
    for a, b in zip(both.layers, alone.layers):
        assert held(a) == held(b)


def test_the_default_comes_from_the_scorer():
    """chunk_scores=None takes the scorer's declared default ("max" for DefensiveKV, chosen by measurement); a value
    the user gives is kept; a custom scorer declaring an unknown mode is refused when built."""
    model = tiny_model("llama")
    assert AdaKVCache(model, 0.2, method="defensivekv").policy.chunk_scores == "max"
    assert AdaKVCache(model, 0.2, method="layer-defensivekv").policy.chunk_scores == "max"
    assert AdaKVCache(model, 0.2, method="ada-snapkv").policy.chunk_scores == "latest"
    assert AdaKVCache(model, 0.2, method="criticalkv").policy.chunk_scores == "latest"
    assert AdaKVCache(model, 0.2, method="defensivekv", chunk_scores="latest").policy.chunk_scores == "latest"
    assert AdaKVCache(model, 0.2, method="ada-snapkv", chunk_scores="max").policy.chunk_scores == "max"

    class Odd(TableScorer):
        chunk_scores = "sometimes"

    with pytest.raises(ValueError, match="Odd.chunk_scores must be one of"):
        AdaKVCache(model, 0.2, scorer=Odd())
    assert AdaKVCache(model, 0.2, scorer=Odd(), chunk_scores="latest").policy.chunk_scores == "latest"


@pytest.mark.parametrize("decode", [None, "rescore"])
def test_held_scores_are_freed_when_the_prompt_is_over(decode):
    """Only a prompt chunk's cut reads the held scores: a one-shot or chunked prompt keeps them until the first
    forward that is not a prompt chunk, and a decode-time re-selection does not store them again."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 90), generator=torch.Generator().manual_seed(6))
    for chunked in (False, True):
        cache = AdaKVCache(model, 0.25, method="defensivekv", window=WINDOW, decode=decode)
        layers = [layer for layer in cache.layers if isinstance(layer, AdaKVLayer)]
        with torch.no_grad():
            if chunked:
                prefill_in_chunks(model, cache, ids, CHUNK)
            else:
                model(ids, **with_cache(cache))
            assert all(layer.held_scores is not None for layer in layers)
            token = ids[:, -1:]
            for _ in range(20):  # rescore re-selects every 16 decoded tokens
                token = model(token, **with_cache(cache)).logits[:, -1:].argmax(-1)
        assert all(layer.held_scores is None for layer in layers), (chunked, decode)
