"""benchmarks/decode_profile.py smoke run (SmolLM2's config, random weights, a short prompt): it profiles the three
caches and writes the JSON and summary it promises. Structure only, no timing asserted."""

from __future__ import annotations

import json

from tiny_models import run_benchmark


def test_decode_profile_writes_every_cache(tmp_path):
    argv = ["--random-weights", "--length", "96", "--steps", "3", "--warmup", "1", "--threads", "1"]
    run_benchmark("decode_profile.py", [*argv, "--out", str(tmp_path)])
    data = json.loads((tmp_path / "profile.json").read_text())
    assert {"command", "date", "machine", "versions", "args", "caches"} <= set(data)
    caches = data["caches"]
    assert [name.split("(")[0] for name in caches] == ["DynamicCache", "StaticCache", "AdaKVCache"]
    for r in caches.values():
        assert r["ms_per_token_unprofiled"] > 0 and r["ms_per_token_profiled"] > 0
        assert r["top_ops"] and all(o["calls_per_token"] > 0 for o in r["top_ops"])
        assert any(o["op"] == "aten::mm" for o in r["top_ops"])
    dynamic, _, ada = (r["kv_bytes"] for r in caches.values())
    assert ada < dynamic  # compacted (budget 0.2, plus the window and slack on a short prompt)
    assert "## AdaKVCache" in (tmp_path / "summary.md").read_text()
