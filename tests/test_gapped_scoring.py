"""Scores belong to tokens, not columns: after a first prompt chunk (or a decode-time rescoring) each KV head
holds different tokens, right-aligned with gaps, and a scorer must give every held token what it gives it in
a dense layout where the evicted tokens are masked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adakv.scorers import TOVA, CriticalKV, DefensiveKV, KeyNorm, ScoreInputs, SnapKV, StagedScores, StreamingLLM
from adakv.scorers.criticalkv import value_perturbation
from adakv.scorers.defensivekv import head_share_of_value
from adakv.scorers.pooling import pool_positions

pytestmark = pytest.mark.fast


def dense_pool_reference(x: torch.Tensor, positions: torch.Tensor, kernel: int, mode: str) -> torch.Tensor:
    """Scatter ``x`` ``[N, L]`` onto a dense position axis (zeros where no column holds a position), pool with
    torch's zero-padded pooling, read back at each column's position."""
    width = int(positions.max()) + 1
    dense = torch.zeros(x.shape[0], width + 1, dtype=x.dtype)
    index = torch.where(positions >= 0, positions, width)  # padding goes to a spare slot, dropped below
    dense.scatter_(-1, index, x)
    dense = dense[:, :width, None].transpose(1, 2)
    pad = kernel // 2
    if mode == "avg":
        pooled = F.avg_pool1d(dense, kernel, stride=1, padding=pad, count_include_pad=True)
    else:
        pooled = F.max_pool1d(F.pad(dense, (pad, pad)), kernel, stride=1)
    return pooled[:, 0].gather(-1, positions.clamp(min=0))


def gapped_positions(rows: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Right-aligned increasing positions with random gaps and random front padding (-1) per row."""
    out = torch.full((rows, width), -1, dtype=torch.long)
    for r in range(rows):
        held = int(torch.randint(1, width + 1, (1,), generator=gen))
        span = held + int(torch.randint(0, 2 * width, (1,), generator=gen))
        pos = torch.randperm(span, generator=gen)[:held].sort().values
        out[r, width - held :] = pos
    return out


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_pool_positions_matches_a_dense_position_axis(mode, kernel):
    gen = torch.Generator().manual_seed(kernel)
    positions = gapped_positions(12, 20, gen)
    x = torch.rand(12, 20, generator=gen).masked_fill(positions < 0, 0.0)
    got = pool_positions(x, positions, kernel, mode)
    real = positions >= 0
    torch.testing.assert_close(got[real], dense_pool_reference(x, positions, kernel, mode)[real])


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_pool_positions_on_contiguous_tokens_is_torch_pooling(mode):
    x = torch.rand(3, 1, 17, generator=torch.Generator().manual_seed(0))
    if mode == "avg":
        expected = F.avg_pool1d(x, 5, stride=1, padding=2, count_include_pad=True)
    else:
        expected = F.max_pool1d(F.pad(x, (2, 2)), 5, stride=1)
    torch.testing.assert_close(pool_positions(x, torch.arange(17), 5, mode), expected)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads_x_dim: int, gen: torch.Generator):
        super().__init__()
        self.o_proj = nn.Linear(heads_x_dim, hidden, bias=False)
        self.o_proj.weight.data = torch.randn(hidden, heads_x_dim, generator=gen)


def dense_and_gapped(held: list[list[int]], length: int, window: int, group: int = 2, dim: int = 8, seed: int = 0):
    """The same tokens in two layouts: dense (every position a column, the ones a head does not hold masked)
    and right-aligned compacted (each head's held tokens only, padded in front). ``held[h]``: head h's
    positions; all heads hold the last ``window`` positions (the observation window, the queries' own)."""
    gen = torch.Generator().manual_seed(seed)
    heads = len(held)
    keys = torch.randn(1, heads, length, dim, generator=gen)
    values = torch.randn(1, heads, length, dim, generator=gen)
    queries = torch.randn(1, heads * group, window, dim, generator=gen)
    module = _Attention(16, heads * group * dim, gen)
    valid = torch.zeros(1, heads, length, dtype=torch.bool)
    for h, pos in enumerate(held):
        valid[0, h, pos] = True
    positions = torch.arange(length).expand(1, heads, length).masked_fill(~valid, -1)
    dense = ScoreInputs(queries, keys, values, valid, window, dim**-0.5, None, module, positions=positions.clone())
    width = max(len(p) for p in held)
    g_keys = torch.zeros(1, heads, width, dim)
    g_values = torch.zeros(1, heads, width, dim)
    g_valid = torch.zeros(1, heads, width, dtype=torch.bool)
    g_pos = torch.full((1, heads, width), -1)
    for h, pos in enumerate(held):
        cols = slice(width - len(pos), width)
        g_keys[0, h, cols], g_values[0, h, cols] = keys[0, h, pos], values[0, h, pos]
        g_valid[0, h, cols], g_pos[0, h, cols] = True, torch.tensor(pos)
    gapped = ScoreInputs(queries, g_keys, g_values, g_valid, window, dim**-0.5, None, module, positions=g_pos)
    return dense, gapped


SCORERS = {
    "snapkv-max": SnapKV,
    "snapkv-avg": lambda: SnapKV(pooling="avg", kernel_size=5),
    "defensivekv": DefensiveKV,
    "criticalkv": CriticalKV,
    "tova": TOVA,
    "knorm": KeyNorm,
    "streamingllm": lambda: StreamingLLM(sinks=3),
}


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scores_follow_tokens_not_columns(name):
    """Head 0 holds every token, head 1 has lost some (a gap in the middle, one next to the window), head 2
    others: each held token scores the same in both layouts. Before the scores were matched by position,
    DefensiveKV normalized its value term over columns (another head's different token) and pooled across
    the gaps as if the tokens were adjacent."""
    length, window = 40, 4
    held = [
        list(range(length)),
        [p for p in range(length) if p not in (7, 8, 9, 20, 35)],
        [p for p in range(length) if p % 3 != 1 or p >= length - window],
    ]
    dense, gapped = dense_and_gapped(held, length, window)
    scorer = SCORERS[name]()
    a, b = scorer(dense), scorer(gapped)
    pairs = [(a.first, b.first), (a.second, b.second)] if isinstance(a, StagedScores) else [(a, b)]
    for x, y in pairs:
        for h, pos in enumerate(held):
            torch.testing.assert_close(y[0, h, y.shape[-1] - len(pos) :], x[0, h, pos], msg=f"{name} head {h}")


def test_value_share_of_a_token_other_heads_evicted_is_estimated_not_inflated():
    """Two KV heads; head 1 evicted position 1. Head 0's share of position 1 is N / (2 * N) = 1/2 (the missing
    head estimated by the mean of the holders), not 1 (which would rank the token higher for having been
    evicted elsewhere); position 0, held by both, keeps the paper's N_0 / (N_0 + N_1)."""
    held = [[0, 1, 2, 3], [0, 2, 3]]
    _, gapped = dense_and_gapped(held, 4, 2, group=1, dim=4)
    share = head_share_of_value(gapped)
    n = value_perturbation(gapped)
    torch.testing.assert_close(share[0, 0, 1], torch.tensor(0.5))
    torch.testing.assert_close(share[0, 0, 0], n[0, 0, 0] / (n[0, 0, 0] + n[0, 1, 1]))  # head 1: pad, then 0


def test_defensive_floor_is_a_mean_over_the_tokens_seen():
    """After evictions the prior correction's mean is over every prefix token seen (evicted ones count 0):
    sum of the held tokens' risk / n_seen, per head. ``floor_mean="held"`` divides by the held tokens instead.
    On a contiguous prompt the two are the same scores."""
    from adakv.scorers.base import window_attention
    from adakv.scorers.defensivekv import defensive_aggregation

    length, window = 30, 4
    held = [list(range(length)), [p for p in range(length) if p % 2 == 0 or p >= length - window]]
    _, gapped = dense_and_gapped(held, length, window, seed=3)
    attn = window_attention(gapped)
    raw = defensive_aggregation(attn, torch.zeros_like(gapped.valid), 5, gapped.positions)  # no floor (mean 0)
    width = gapped.keys.shape[2]
    prefix = gapped.valid.clone()
    prefix[..., width - window :] = False
    for floor_mean, over_seen in (("seen", True), ("held", False)):
        risk = defensive_aggregation(attn, gapped.valid, 5, gapped.positions, over_seen)
        for h in range(2):
            n = length - window if over_seen else int(prefix[0, h].sum())
            mean = raw[0, h][prefix[0, h]].sum() / n
            expected = torch.maximum(raw[0, h], mean)[prefix[0, h]]
            torch.testing.assert_close(risk[0, h][prefix[0, h]], expected, msg=f"{floor_mean} head {h}")
    # head 1 holds 13 of the 26 prefix tokens: its floor differs between the two
    assert not torch.equal(
        defensive_aggregation(attn, gapped.valid, 5, gapped.positions, True)[0, 1],
        defensive_aggregation(attn, gapped.valid, 5, gapped.positions, False)[0, 1],
    )
    dense, _ = dense_and_gapped([list(range(length))] * 2, length, window, seed=4)
    torch.testing.assert_close(DefensiveKV(floor_mean="seen")(dense), DefensiveKV(floor_mean="held")(dense))
    # a left-padded batch, one row shorter than the window (its window columns are padding, position -1):
    # the same scores either way on a contiguous prompt
    gen = torch.Generator().manual_seed(5)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[0, :9] = False
    valid[1, : length - 3] = False
    keys, values = torch.randn(2, 2, length, 8, generator=gen), torch.randn(2, 2, length, 8, generator=gen)
    queries = torch.randn(2, 4, window, 8, generator=gen)
    padded = ScoreInputs(queries, keys, values, valid, window, 8**-0.5, None, dense.module)
    torch.testing.assert_close(DefensiveKV(floor_mean="seen")(padded), DefensiveKV(floor_mean="held")(padded))
    with pytest.raises(ValueError, match="floor_mean"):
        DefensiveKV(floor_mean="all")


def test_defensivekv_value_share_ignores_garbage_in_padding_columns():
    """A view's front padding reads whatever the storage's slack rows hold (NaN included): it must not reach the
    share of any real token (it used to poison the token at position 0 through the sum over heads)."""
    from tiny_models import tiny_model

    from adakv.scorers.defensivekv import head_share_of_value

    attn = tiny_model("llama", num_hidden_layers=1).model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    bsz, heads, seq, dim = 1, 2, 6, 16
    keys, values = torch.randn(bsz, heads, seq, dim, generator=gen), torch.randn(bsz, heads, seq, dim, generator=gen)
    valid = torch.ones(bsz, heads, seq, dtype=torch.bool)
    valid[0, 1, 0] = False  # head 1 holds one token less: its first column is padding
    positions = torch.arange(seq).expand(bsz, heads, seq).clone()
    positions[0, 1] = torch.tensor([-1, 0, 1, 2, 3, 5])
    queries = torch.randn(bsz, 4, 2, dim, generator=gen)

    def share(v):
        return head_share_of_value(ScoreInputs(queries, keys, v, valid, 2, 0.25, None, attn, 0, 1, positions))

    poisoned = values.clone()
    poisoned[0, 1, 0] = float("nan")
    clean, got = share(values), share(poisoned)
    assert torch.equal(clean[valid], got[valid]) and bool(got[valid].isfinite().all())
