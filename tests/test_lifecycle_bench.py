"""benchmarks/lifecycle.py smoke-run on a tiny random Llama: every command runs and writes the JSON it promises.

Structure only: no timing (and no library bound) is asserted here."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]
META = {"command", "date", "machine", "versions", "git", "model", "args", "seconds"}


@pytest.fixture(scope="module")
def main():
    return runpy.run_path(str(ROOT / "benchmarks" / "lifecycle.py"))["main"]


def one_thread(main, argv: list[str]) -> dict:
    """The script on one torch thread (its --threads), the caller's thread count restored afterwards."""
    before = torch.get_num_threads()
    try:
        return main([*argv, "--threads", "1"])
    finally:
        torch.set_num_threads(before)


def run(main, tmp_path: Path, command: str, *argv: str) -> dict:
    out = tmp_path / f"{command}.json"
    one_thread(main, [command, "--model", "tiny", "--out", str(out), *argv])
    data = json.loads(out.read_text())
    assert set(data) == {"meta", command}
    meta = data["meta"]
    assert META <= set(meta)
    assert meta["command"].startswith(f"python benchmarks/lifecycle.py {command} --model tiny")
    assert {"platform", "cpu_count", "torch_threads"} <= set(meta["machine"])
    assert {"torch", "transformers", "adakv"} <= set(meta["versions"])
    assert out.with_suffix(".md").read_text().strip()
    return data[command]


def test_cascade(main, tmp_path):
    body = run(main, tmp_path, "cascade", "--lengths", "96", "--repeats", "2")
    assert [p["length"] for p in body["points"]] == [96]
    for point in body["points"]:
        assert set(point["runs"]) == {"layer-defensivekv", "defensivekv"}
        for runs in point["runs"].values():
            assert len(runs) == 2
            assert all({"prefill_s", "compress_s", "relayouts", "kv_bytes", "max_tokens"} <= set(r) for r in runs)
        assert isinstance(point["ratio_of_medians"], float) and len(point["paired_ratios"]) == 2


def test_chunked(main, tmp_path):
    body = run(main, tmp_path, "chunked", "--length", "200", "--chunk", "64", "--peak-in-process")
    trace = body["trace"]
    assert [r["tokens_seen"] for r in trace] == [64, 128, 192, 200]
    assert trace[0]["max_kv_bytes_before_cut"] is None  # the first chunk is compacted from the dense K/V
    for row in trace[1:]:
        assert row["max_kv_bytes_before_cut"] > 0 and row["max_layer_bytes_before_cut"] > 0
    assert [p["config"] for p in body["peaks"]] == ["adakv-chunked", "adakv-oneshot", "dynamic", "dynamic-chunked"]
    for peak in body["peaks"]:
        assert {"peak_bytes", "kv_bytes", "prefill_s"} <= set(peak)
    after = body["after_prompt"]
    assert after["full_kv_bytes"] == after["full_kv_bytes_measured"]  # analytic full size = the DynamicCache's
    assert after["chunked_kv_bytes"] == after["chunked_generate_kv_bytes"]  # compressing() loop = generate(chunks)
    assert isinstance(after["chunked_within_budget_plus_slack"], bool)


def test_chunked_bounds_with_an_int_budget(main, tmp_path):
    """An int budget is tokens per head, not a fraction: the bound was computed as budget x seen (32 x full)."""
    body = run(main, tmp_path, "chunked", "--length", "200", "--chunk", "64", "--budget", "32", "--peak-in-process")
    for row in body["trace"]:
        assert row["kv_bytes"] <= row["bound_kv_bytes"] <= 2 * row["kv_bytes"]
    after = body["after_prompt"]
    assert after["budget_times_full"] == after["full_kv_bytes"] * 32 / 200


def test_peak_worker_prints_one_json_line(main, capsys):
    one_thread(
        main, ["peak-worker", "--model", "tiny", "--config", "adakv-chunked", "--length", "150", "--chunk", "64"]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["config"] == "adakv-chunked" and result["kv_bytes"] > 0


def test_decode(main, tmp_path):
    argv = ["--prompt-tokens", "64", "--tokens", "12", "--budget", "16", "--interval", "4", "--repeats", "1"]
    body = run(main, tmp_path, "decode", *argv)
    names = ["full"] + [f"{m}/{p}" for m in ("snapkv", "ada-snapkv", "defensivekv") for p in ("rescore", "none")]
    assert list(body["configs"]) == [*names, "h2o/h2o", "h2o/none"]
    assert len(body["reference_tokens"]) == 12
    for name, row in body["configs"].items():
        run_ = body["runs"][name][0]
        assert len(run_["tokens"]) == len(run_["kv_bytes"]) == len(run_["max_segment_tokens"]) == 12
        assert len(run_["step_ms"]) == 11
        assert row["max_kv_bytes"] == max(run_["kv_bytes"]) and row["bound_kv_bytes"] == body["bound_kv_bytes"]
        if name == "full":
            continue
        assert 0 <= row["greedy_agreement"] <= 1 and len(row["teacher_forced_hits"]) == 12
        assert row["first_divergence"] is None or 0 <= row["first_divergence"] < 12
        if not name.endswith("/none"):
            assert isinstance(row["within_bound"], bool) and "overhead_vs_none" in row


def test_context_times_every_context_scorer_against_a_plain_prefill(main, tmp_path):
    body = run(main, tmp_path, "context", "--in-process", "--repeats", "1", "--length", "300")
    configs = body["configs"]
    assert set(configs) == {"dynamic", "ada-snapkv", "kvzip", "kvzip+", "kvzip-defensive"}
    for name in ("ada-snapkv", "kvzip", "kvzip+", "kvzip-defensive"):  # really compacted: about 0.2 of the full
        assert 0.1 < configs[name]["kv_bytes"] / configs["dynamic"]["kv_bytes"] < 0.35
    assert all(c["seconds"] > 0 for c in configs.values())


def test_bad_settings_are_refused(main, tmp_path):
    with pytest.raises(SystemExit):
        one_thread(main, ["decode", "--model", "tiny", "--budget", "0.2", "--out", str(tmp_path / "x.json")])
