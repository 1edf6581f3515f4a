"""benchmarks/compare_quality.py on hand-made results: the table's differences and the summary's counts."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, scores: dict, **args) -> str:
    path.mkdir()
    rows = [
        {"task": "niah_single", "length": 2000, "mode": "aware", "method": m, "budget": b, "score": s}
        for (m, b), s in scores.items()
    ]
    (path / "results.json").write_text(json.dumps({"rows": rows, "meta": {"args": {"samples": 8, **args}}}))
    return str(path)


def test_compare_quality_counts(tmp_path, capsys):
    base = write(tmp_path / "a", {("full", 1.0): 1.0, ("snapkv", 0.2): 0.5, ("snapkv", 0.5): 0.75})
    var = write(tmp_path / "b", {("full", 1.0): 1.0, ("snapkv", 0.2): 0.625, ("snapkv", 0.5): 0.75})
    main = runpy.run_path(str(ROOT / "benchmarks" / "compare_quality.py"))["main"]
    main(["--baseline", f"one={base}", "--variant", f"two={var}"])
    out = capsys.readouterr().out
    assert "| niah_single | 2000 | aware | snapkv | 0.2 | 0.500 | 0.625 | +0.125 |" in out
    assert "two vs one: 2 cells, 1 within 0.05, 1 better, 0 worse, mean difference +0.062" in out


def test_compare_quality_refuses_runs_of_different_samples(tmp_path):
    base = write(tmp_path / "a", {("full", 1.0): 1.0}, seed=0)
    var = write(tmp_path / "b", {("full", 1.0): 1.0}, seed=1)
    main = runpy.run_path(str(ROOT / "benchmarks" / "compare_quality.py"))["main"]
    with pytest.raises(SystemExit, match="seed=1 .* seed=0"):
        main(["--baseline", f"one={base}", "--variant", f"two={var}"])
