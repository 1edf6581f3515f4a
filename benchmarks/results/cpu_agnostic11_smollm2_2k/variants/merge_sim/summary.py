"""Table of merge_sim.py's runs (every *.jsonl here): multi-query score per (scorer, alpha, budget, variant) over
the questions every run answered, with the questions gained / lost against kvzip+ at 0.2 without summaries."""

import collections
import glob
import json
import os

runs = collections.defaultdict(dict)
for path in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.jsonl"))):
    for line in open(path):
        r = json.loads(line)
        plain = r.get("plain", False)
        value_only = "kvzip+, value weight only (no 1 / norm(h))"
        scorer = "kvzip" if plain else (value_only if r.get("value_only") else "kvzip+")
        scorer += ", layer-normalized" if r.get("layer_norm") else ""
        scorer = "full cache" if r["variant"] == "full" else scorer
        variant = "-" if r["variant"] == "full" else r["variant"]
        key = (scorer, r.get("alpha", 0.0), 1.0 if r["variant"] == "full" else r.get("budget", 0.2), variant)
        runs[key][(r["sample"], r["question"])] = r["score"]
common = set.intersection(*(set(v) for v in runs.values()))
base = runs[("kvzip+", 0.0, 0.2, "none")]
plain = runs[("kvzip", 0.0, 0.2, "none")]
LAYERS = 30  # SmolLM2-135M


def memory(budget: float, variant: str) -> str:
    """K/V kept as a fraction of the full cache: the budget, plus at most one summary per bin of the context."""
    if "@" in variant:
        lo, hi = variant.split("@")[1].split("-")
        return f"only layers {lo}-{int(hi) - 1} compressed"
    if variant.startswith("bin"):
        name, lo, hi = (variant.replace("~", "-").split("-") + [0, LAYERS])[:3]
        return f"<= {budget + (int(hi) - int(lo)) / LAYERS / int(name[3:]):.3f}"
    if variant == "meanall":
        return f"{budget:.3f} + 1 row/head"
    return f"{budget:.3f}"


print(
    f"{len(common)} questions (16 samples x 4 keys), SmolLM2-135M fp32, 2k tokens, question-agnostic multi-query; "
    "CPU (2-core x86_64, 1 thread per run, two runs at a time), torch 2.13, 2026-11-24.\n\n"
    "Runs: `python ../merge_sim.py --samples 16 [--first 0 --samples 8] [--budget B] [--alpha A] [--plain] "
    "--variants ... --out FILE.jsonl` (base_*: `--variants full none meanall bin64 bin16 none@0-15 none@15-30`); "
    "`binN~lo-hi`: summaries only in layers lo..hi-1 (every layer compressed); `--layer-norm`: each layer's "
    "scores divided by their mean before the global cut. This table: `python summary.py > summary.md`.\n"
)
print(
    "| scores | LayerAdaptive alpha | budget | summaries | K/V kept / full | score | vs kvzip+ 0.2: gained / lost "
    "| vs kvzip 0.2: gained / lost |"
)
print("|---|---|---|---|---|---|---|---|")
for key in sorted(runs, key=lambda k: (k[0] != "full cache", k[0], k[1], k[2], k[3])):
    scorer, alpha, budget, variant = key
    d = runs[key]
    score = sum(d[q] for q in common) / len(common)
    gained = sum(d[q] > base[q] for q in common)
    lost = sum(d[q] < base[q] for q in common)
    cells = [scorer, f"{alpha:g}", f"{budget:g}", variant, memory(budget, variant), f"{score:.3f}"]
    vs_plain = f"+{sum(d[q] > plain[q] for q in common)} / -{sum(d[q] < plain[q] for q in common)}"
    print("| " + " | ".join(cells) + f" | +{gained} / -{lost} | {vs_plain} |")
