"""The speed suite's measurement (adakv/eval/speed.py, `adakv-bench speed`) and benchmarks/gpu_speed.py on CPU.

Structure only: speed itself is never asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
from transformers import DynamicCache

from adakv import AdaKVCache, kv_bytes
from adakv.eval import speed
from adakv.eval.cli import build_parser, main

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer saved as a checkpoint directory (what --model accepts)."""
    from transformers import AutoTokenizer

    from adakv.gguf_convert import is_complete
    from adakv.models import default_cache_dir, load_smollm2

    converted = default_cache_dir("smollm2")  # the tokenizer alone when SmolLM2 is converted already
    tok = AutoTokenizer.from_pretrained(converted) if is_complete(converted) else load_smollm2()[1]
    path = tmp_path_factory.mktemp("tiny-smollm2-vocab")
    tiny = tiny_model("llama", vocab_size=len(tok), pad_token_id=2, bos_token_id=1, eos_token_id=2)
    tiny.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gpu_speed():
    spec = importlib.util.spec_from_file_location("gpu_speed", ROOT / "benchmarks" / "gpu_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_speed_alternates_the_contenders_blocks(gpu_speed):
    """The kernel and its baseline are timed in alternated blocks (they ran one after the other)."""
    order = []
    a, b = (lambda: order.append("a")), [lambda: order.append("b1"), lambda: order.append("b2")]
    times = gpu_speed.timed_alternated([a, b], "cpu", repeats=3, calls=2)
    assert len(times) == 2 and all(t >= 0 for t in times)
    warmup, blocks = order[:3], order[3:]
    assert warmup == ["a", "b1", "b2"]
    assert blocks == ["a", "a", "b1", "b2"] * 3


def _prompt(model, n: int, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, model.config.vocab_size, (batch, n), generator=gen).to(model.device)


def test_percentile():
    values = [float(v) for v in range(1, 101)]
    assert speed.percentile(values, 50) == pytest.approx(50.5)
    assert speed.percentile(values, 99) == pytest.approx(99.01)
    assert speed.percentile([3.0], 99) == 3.0
    assert speed.percentile([2.0, 1.0], 0) == 1.0 and speed.percentile([2.0, 1.0], 100) == 2.0


@pytest.mark.parametrize("batch", [1, 2])
def test_measure_decodes_every_step_through_generate(model, batch):
    """Exactly `steps` decode forwards are timed, past what the slack held (a re-layout inside the timing)."""
    steps, n = 20, 64  # 20 > MIN_SLACK = 16 rows of slack given to every segment at prefill
    ids = _prompt(model, n, batch)
    caches = []

    def make():
        caches.append(AdaKVCache(model, budget=0.25))
        return caches[-1]

    row = speed.measure(model, ids, make, steps, memory=False)
    assert set(speed.METRICS) <= set(row)
    assert row["decode_tokens"] == steps
    assert caches[-1].get_seq_length() == n + steps  # the prompt, then one forward per timed step
    assert kv_bytes(caches[-1]) > row["kv_bytes"]  # held after the prefill: the segments grew while timed
    assert 0 < row["decode_p50_ms"] <= row["decode_p99_ms"]
    assert row["decode_ms"] > 0 and row["prefill_s"] > row["compress_s"] > 0
    assert row["peak_bytes"] is None

    full = speed.measure(model, ids, lambda: DynamicCache(config=model.config), 3)
    assert full["decode_tokens"] == 3 and full["compress_s"] == 0
    assert full["decode_p99_ms"] >= full["decode_p50_ms"] > 0


def test_eos_does_not_stop_the_timed_decode(model):
    """The greedy continuation's own first token made the EOS: generate still decodes every step."""
    ids = _prompt(model, 40)
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = first
    try:
        row = speed.measure(model, ids, lambda: AdaKVCache(model, budget=0.5), 6, memory=False)
    finally:
        model.generation_config.eos_token_id = saved
    assert row["decode_tokens"] == 6


def test_cli_speed_rows_carry_the_step_statistics(tiny_dir, tmp_path):
    assert build_parser().parse_args(["speed", "--out", "x"]).decode_steps >= 256
    out = tmp_path / "s"
    argv = ["speed", "--model", tiny_dir, "--methods", "ada-snapkv", "--budgets", "0.25", "--lengths", "80"]
    assert main([*argv, "--repeats", "2", "--decode-steps", "5", "--no-plots", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert {"command", "versions", "machine", "date"} <= set(data["meta"])
    full, ours = data["rows"]
    assert (full["method"], ours["method"]) == ("full", "ada-snapkv")
    for row in (full, ours):
        assert row["decode_tokens"] == 5
        assert 0 < row["decode_p50_ms"] <= row["decode_p99_ms"]
        assert row["decode_ms"] > 0
    for key in ("decode_ms", "decode_p50_ms", "decode_p99_ms"):
        assert full[f"{key}_ratio"] == 1.0
        assert ours[f"{key}_ratio"] == pytest.approx(ours[key] / full[key])


def test_cli_speed_compile_compiles_the_static_and_adakv_decode(tiny_dir, tmp_path, monkeypatch):
    """--compile: generate gets a CompileConfig; the StaticCache's and the AdaKVCache's (built with a reserve for
    the decoded tokens) decode steps are compiled, the DynamicCache's is not."""
    from transformers import CompileConfig

    compiled_caches = []
    real_measure = speed.measure

    def measure(model, ids, make_cache, steps, memory=True, compile_config=None):
        def make():
            cache = make_cache()
            compiled_caches.append((type(cache).__name__, cache.is_compileable, compile_config is not None))
            return cache

        return real_measure(model, ids, make, steps, memory, compile_config)

    def aot_eager(device):  # the default (inductor) would build C++ here; the wiring is what is tested
        config = CompileConfig(backend="aot_eager", dynamic=True)
        config._compile_all_devices = True
        return config

    monkeypatch.setattr(speed, "measure", measure)
    monkeypatch.setattr(speed, "compile_config_for", aot_eager)
    torch._dynamo.reset()
    out = tmp_path / "c"
    argv = ["speed", "--model", tiny_dir, "--methods", "ada-snapkv", "--budgets", "0.25", "--lengths", "80"]
    argv += ["--static", "--compile", "--repeats", "1", "--decode-steps", "20", "--no-plots", "--out", str(out)]
    from torch._dynamo.utils import counters

    counters.clear()
    assert main(argv) == 0
    assert counters["stats"]["unique_graphs"] >= 2  # the StaticCache's step and the AdaKVCache's were compiled
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["full", "static", "ada-snapkv"]
    assert all(r["decode_tokens"] == 20 and r["error"] is None for r in rows)
    assert {(name, compileable) for name, compileable, given in compiled_caches if given} == {
        ("DynamicCache", False),
        ("StaticCache", True),
        ("AdaKVCache", True),
    }


def test_gpu_speed_script_runs_on_cpu(gpu_speed, tmp_path):
    """benchmarks/gpu_speed.py, smoke-run on the CPU with a tiny Llama shape; writes its JSON where told."""
    out = tmp_path / "smoke.json"
    argv = ["--device", "cpu", "--dtype", "float32", "--layers", "1", "--hidden", "64", "--heads", "4"]
    argv += ["--kv-heads", "2", "--intermediate", "128", "--vocab", "256", "--contexts", "96", "--batches", "1", "2"]
    result = gpu_speed.main([*argv, "--repeats", "2", "--calls", "3", "--decode-steps", "20", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert {"command", "date", "device", "versions"} <= set(result)
    for point in result["attention"]:
        assert point["max_rel_err_vs_reference"] < 1e-4
        assert point["ragged_decode_attention_s"] > 0 and point["full_sdpa_decode_attention_s"] > 0
        assert point["ragged_decode_attention_graph_s"] is None  # CUDA graphs: GPU only
        assert "needs CUDA" in point["flash_vs_triton"]["not_run"]  # the flash A/B says why it did not run
    assert len(result["end_to_end"]) == 2
    for row in result["end_to_end"]:
        for name in ("dynamic", "adakv"):
            assert row[name]["decode_tokens"] == 20
            assert 0 < row[name]["decode_p50_ms"] <= row[name]["decode_p99_ms"]
        assert row["adakv"]["kv_bytes"] < row["dynamic"]["kv_bytes"]
        assert row["adakv"]["kv_bytes"] > row["adakv"]["kv_bytes_after_prefill"]  # grew past the slack


def test_sdpa_baseline_reads_distinct_keys_and_values(gpu_speed, monkeypatch):
    """The full-cache baseline attends with its own V (the old script passed the keys as values)."""
    seen = []
    real = gpu_speed.F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(k is not v and k.data_ptr() != v.data_ptr())
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(gpu_speed.F, "scaled_dot_product_attention", spy)
    args = gpu_speed.argparse.Namespace(device="cpu", kv_heads=2, hidden=64, heads=4, budget=0.2, repeats=1, calls=2)
    gpu_speed.attention_point(args, 64, 1, torch.float32, 1e9)
    assert seen and all(seen)
