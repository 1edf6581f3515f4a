"""RaggedKV: compaction, in-place appends with amortized growth, batch reordering."""

from __future__ import annotations

import torch

from adakv.storage import MIN_SLACK, RaggedKV


def segments(store: RaggedKV, which: str = "keys") -> list:
    buf = getattr(store, which)
    out = []
    for b in range(store.shape[0]):
        for h in range(store.shape[1]):
            s, n = int(store.start[b, h]), int(store.length[b, h])
            out.append(buf[s : s + n].clone())
    return out


def test_from_dense_append_grow_and_select():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 20, 8, generator=gen)
    keep = torch.rand(2, 3, 20, generator=gen) < 0.3
    store = RaggedKV.from_dense(keys, keys.clone(), keep)
    expected = [keys[b, h][keep[b, h]] for b in range(2) for h in range(3)]
    assert all(torch.equal(a, e) for a, e in zip(segments(store), expected))
    assert store.nbytes() == 2 * (int(keep.sum()) + 6 * MIN_SLACK) * 8 * 4

    buffers = store.keys
    relayouts = 0
    for step in range(200):  # decode: one token per sequence per step
        new = torch.randn(2, 3, 1, 8, generator=gen)
        store.append(new, new.clone())
        relayouts += store.keys is not buffers
        buffers = store.keys
        expected = [
            torch.cat([e, new[b, h]]) for (b, h), e in zip([(b, h) for b in range(2) for h in range(3)], expected)
        ]
    assert all(torch.equal(a, e) for a, e in zip(segments(store), expected))
    assert all(torch.equal(a, e) for a, e in zip(segments(store, "values"), expected))
    assert 1 <= relayouts <= 12  # amortized: geometric growth, not a copy per token
    assert torch.equal(store.lengths(), torch.tensor([[len(e) for e in expected[:3]], [len(e) for e in expected[3:]]]))

    store.select_batch(torch.tensor([1, 1, 0]))  # beam reorder with a duplicated row
    segs = segments(store)
    order = [expected[3:], expected[3:], expected[:3]]
    assert all(torch.equal(a, e) for a, e in zip(segs, [e for row in order for e in row]))
    new = torch.randn(3, 3, 1, 8, generator=gen)
    store.append(new, new)  # duplicated rows own separate storage now
    assert not torch.equal(segments(store)[0][-1], segments(store)[3][-1])


def test_append_with_padding_inside_chunk():
    keys = torch.arange(2 * 1 * 4 * 2, dtype=torch.float32).reshape(2, 1, 4, 2)
    store = RaggedKV.from_dense(keys, keys, torch.ones(2, 1, 4, dtype=torch.bool), slack=0)
    new = torch.full((2, 1, 3, 2), -1.0)
    new[1, 0, 1:] = torch.tensor([[7.0, 7.0], [8.0, 8.0]])
    valid = torch.tensor([[True, True, True], [False, True, True]])
    store.append(new, new, valid)
    assert store.lengths().tolist() == [[7], [6]]
    assert segments(store)[1][-2:].tolist() == [[7.0, 7.0], [8.0, 8.0]]
