"""How often a prefill's compression makes the host wait for the device (issue #10, section 6).

Every deliberate read of a device value goes through ``adakv.host.to_host``; these tests count its calls per
compressed layer during a prefill, so a change that adds a read shows here. A CPU run cannot see a stray
``.cpu()`` or ``int(tensor)`` on a device tensor (on a CPU every tensor is a host tensor): those show on a GPU,
where ``benchmarks/prefill_overhead.py`` counts the synchronizing operations torch reports."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ToyTokenizer, run_benchmark, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from adakv import AdaKVCache, KVzip, compress_context, host, with_cache
from adakv.layer import AdaKVLayer
from adakv.scorers import ExpectedAttention


def _ids(bsz: int, seq: int) -> torch.Tensor:
    return torch.randint(5, 100, (bsz, seq), generator=torch.Generator().manual_seed(0))


def _reads_per_layer(monkeypatch, cache: AdaKVCache, model, ids, mask=None) -> float:
    calls = []
    real = host.to_host
    monkeypatch.setattr(host, "to_host", lambda *t: calls.append(len(t)) or real(*t))
    with torch.no_grad():
        model(ids, attention_mask=mask, **with_cache(cache))
    monkeypatch.setattr(host, "to_host", real)
    return len(calls) / sum(isinstance(layer, AdaKVLayer) for layer in cache.layers)


@pytest.mark.fast
@pytest.mark.parametrize("method", ["ada-snapkv", "snapkv", "defensivekv", "ada-criticalkv", "pyramidkv"])
def test_one_read_per_layer_without_padding_two_with(monkeypatch, method):
    model = tiny_model("llama")
    ids = _ids(2, 96)
    # no padding: only the kept counts are read (they size the storage)
    assert _reads_per_layer(monkeypatch, AdaKVCache(model, 0.3, method=method), model, ids) == 1
    # left padding: the real-token counts and the padding check come in one more read
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    cache = AdaKVCache(model, 0.3, method=method)
    assert _reads_per_layer(monkeypatch, cache, model, ids, mask) == 2
    assert cache.layers[0].n_real.tolist() == [96, 87]


@pytest.mark.fast
def test_to_host_reads_several_tensors_in_one_transfer():
    a, b, c = torch.tensor([[1, 2], [3, 4]]), torch.tensor(True), torch.tensor([7], dtype=torch.int32)
    got = host.to_host(a, b, c)
    assert [t.shape for t in got] == [a.shape, b.shape, c.shape] and all(t.dtype == torch.int64 for t in got)
    assert got[0].tolist() == [[1, 2], [3, 4]] and got[1].item() == 1 and got[2].tolist() == [7]


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.fast
def test_triton_compaction_has_no_data_dependent_shapes():
    """The Triton backend compacts with a masked launch over every (segment, position), not ``nonzero`` (whose
    output size must be read on the host): same tokens as the torch backend's compaction."""
    pytest.importorskip("triton")
    model = tiny_model("llama")
    ids = _ids(2, 64)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    kept = {}
    for backend in ("torch", "triton"):
        cache = AdaKVCache(model, 0.3, method="ada-snapkv", backend=backend)
        ops = _Ops()
        with torch.no_grad(), ops:
            model(ids, attention_mask=mask, **with_cache(cache))
        if backend == "triton":
            assert "aten.nonzero.default" not in ops.names
        layer = cache.layers[1]
        keys, inside = layer.store.view(layer.store.keys)
        kept[backend] = (layer.kept_lengths(), keys[inside])  # the rows in front of a shorter segment are not its
    assert torch.equal(kept["torch"][0], kept["triton"][0])
    assert torch.equal(kept["torch"][1], kept["triton"][1])


def test_prefill_overhead_benchmark_runs(tmp_path):
    """benchmarks/prefill_overhead.py smoke run (SmolLM2's config, random weights, a short prompt): it writes the
    figures it promises; structure only, no timing asserted."""
    import json

    argv = ["--random-weights", "--lengths", "80", "--repeats", "1", "--threads", "1", "--methods", "ada-snapkv"]
    run_benchmark("prefill_overhead.py", [*argv, "--out", str(tmp_path)])
    data = json.loads((tmp_path / "overhead.json").read_text())
    assert {"command", "date", "machine", "versions", "rows"} <= set(data)
    (row,) = data["rows"]
    assert row["method"] == "ada-snapkv" and row["length"] == 80
    assert 0 < row["compress_s"] < row["prefill_s"] and 0 < row["compress_fraction"] < 1
    assert row["host_reads_per_layer"] == 1  # no padding: the kept counts only
    assert row["cuda_syncs"] is None  # counted on CUDA only
    assert "| 80 | 1 | ada-snapkv |" in (tmp_path / "summary.md").read_text()


@pytest.mark.fast
def test_context_scorers_read_no_device_scalar_while_scoring(monkeypatch):
    """ExpectedAttention on a default-RoPE model and KVzip's per-pass scoring read nothing from the device: the
    length a RoPE type may depend on is read only for the length-dependent types; KVzip's context width comes
    from the host counts and its padding factor is applied without first testing whether the pass has padding.
    A CPU run sees the reads as ``aten._local_scalar_dense`` (what ``int(tensor)`` runs) though they cost nothing
    here."""
    model = tiny_model("llama")
    ids = _ids(2, 64)
    reads = {}
    for name, scorer, entry in (
        ("expected", ExpectedAttention(), "__call__"),
        ("kvzip", KVzip(chunk_size=24), "observe"),
    ):
        ops = _Ops()
        real = getattr(type(scorer), entry)

        def counted(self, *args, _real=real, _ops=ops):
            with _ops:
                return _real(self, *args)

        monkeypatch.setattr(type(scorer), entry, counted)
        cache = AdaKVCache(model, 0.3, scorer=scorer)
        with torch.no_grad():
            if name == "kvzip":
                compress_context(model, cache, ids, tokenizer=ToyTokenizer())
            else:
                model(ids, **with_cache(cache))
        reads[name] = ops.names.count("aten._local_scalar_dense.default")
    assert reads == {"expected": 0, "kvzip": 0}
