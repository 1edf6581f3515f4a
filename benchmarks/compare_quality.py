"""Side-by-side table of `adakv-bench quality` runs: a baseline and variants over the same cells.

    python benchmarks/compare_quality.py --baseline one_shot=DIR [DIR ...] --variant chunked=DIR [DIR ...] \
        [--variant NAME=DIR ...] [--tolerance 0.05]

Each DIR holds a results.json; several DIRs under one name are merged (later ones win). Prints, as markdown,
one row per (task, length, mode, method, budget) cell of the first variant, each variant's score and its
difference from the baseline, then per variant: cells within the tolerance of the baseline, cells better,
cells worse, and the mean difference over the cells. Cells where the full cache scores 0 (nothing to lose)
are listed but left out of the summary. Runs whose samples differ (model, dtype, samples, seed, digits, haystack,
window or depths, as their results.json records them) are refused."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

Cell = tuple[str, int, str, str, float]


# what must agree between compared runs for their cells to hold the same prompts (absent in a run: not checked)
SAME = ("model", "dtype", "samples", "seed", "digits", "haystack", "window", "depths")


def load(dirs: list[str], setup: dict[str, tuple[str, object]]) -> dict[Cell, float]:
    """Scores by cell; ``setup`` collects each SAME argument's first value (and its run) and refuses a mismatch."""
    scores: dict[Cell, float] = {}
    for d in dirs:
        data = json.loads((Path(d) / "results.json").read_text())
        given = data.get("meta", {}).get("args", {})
        for key in SAME:
            if key not in given:
                continue
            first = setup.setdefault(key, (d, given[key]))
            if first[1] != given[key]:
                raise SystemExit(
                    f"{d} was run with {key}={given[key]!r} but {first[0]} with {key}={first[1]!r}: their cells do "
                    "not hold the same prompts."
                )
        for row in data["rows"]:
            scores[(row["task"], row["length"], row["mode"], row["method"], row["budget"])] = row["score"]
    return scores


def named(spec: list[str]) -> tuple[str, list[str]]:
    name, _, first = spec[0].partition("=")
    if not first:
        raise SystemExit(f"expected NAME=DIR, got {spec[0]!r}")
    return name, [first, *spec[1:]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", nargs="+", required=True, metavar="NAME=DIR [DIR]")
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME=DIR [DIR]")
    parser.add_argument("--tolerance", type=float, default=0.05)
    args = parser.parse_args(argv)
    base_name, base_dirs = named(args.baseline)
    setup: dict[str, tuple[str, object]] = {}
    base = load(base_dirs, setup)
    variants = [(name, load(dirs, setup)) for name, dirs in map(named, args.variant)]
    cells = sorted(variants[0][1], key=lambda c: (c[2], c[0], c[1], c[3] != "full", c[3], c[4]))
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    head = ["task", "length", "mode", "method", "budget", base_name]
    for name, _ in variants:
        head += [name, "diff"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for cell in cells:
        row = [cell[0], str(cell[1]), cell[2], cell[3], f"{cell[4]:g}", fmt(base.get(cell))]
        for _, scores in variants:
            v, b = scores.get(cell), base.get(cell)
            row += [fmt(v), "-" if v is None or b is None else f"{v - b:+.3f}"]
        print("| " + " | ".join(row) + " |")
    print()
    for name, scores in variants:
        diffs = []
        for cell, v in scores.items():
            full = base.get((cell[0], cell[1], cell[2], "full", 1.0))
            if cell[3] == "full" or cell not in base or not full:
                continue
            diffs.append(v - base[cell])
        if not diffs:
            print(f"{name}: no cell shared with {base_name}")
            continue
        tol = args.tolerance + 1e-9  # a difference of exactly the tolerance (e.g. 1/20 at 0.05) is within it
        within = sum(abs(d) <= tol for d in diffs)
        better = sum(d > tol for d in diffs)
        print(
            f"{name} vs {base_name}: {len(diffs)} cells, {within} within {args.tolerance:g}, {better} better, "
            f"{len(diffs) - within - better} worse, mean difference {sum(diffs) / len(diffs):+.3f}"
        )


if __name__ == "__main__":
    main()
