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


def test_uneven_segments_grow_as_rarely_as_even_ones():
    """A decoded token adds a row to every segment, so growth gives every segment the same slack (a fraction of the
    mean length): Ada-KV's uneven heads (here one long, one empty) re-lay the layer out no more often than even
    ones, for the same memory. (With a slack proportional to each segment's own length the empty head ran out every
    few tokens: 24 re-layouts of the whole layer in 1,000 tokens.)"""

    def relayouts(lengths, steps=1000):
        heads, dim = len(lengths), 8
        keep = torch.zeros(1, heads, max(lengths), dtype=torch.bool)
        for h, n in enumerate(lengths):
            keep[0, h, :n] = True
        keys = torch.randn(1, heads, max(lengths), dim)
        store = RaggedKV.from_dense(keys, keys, keep)
        new, count, buffer = torch.zeros(1, heads, 1, dim), 0, store.keys
        for _ in range(steps):
            store.append(new, new)
            count += store.keys is not buffer
            buffer = store.keys
        return count, store.nbytes()

    even, uneven = relayouts([8000, 8000]), relayouts([16000, 0])
    assert uneven[0] <= even[0] <= 2 and uneven[1] == even[1]
