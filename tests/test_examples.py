"""The plain-script examples run (small sizes) so they cannot rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("one_liner", {"context_tokens": 400}),
        ("batch_generation", {"lengths": (300, 450)}),
        ("question_agnostic", {"context_tokens": 400}),
    ],
)
def test_example_runs(name, kwargs, capsys):
    result = load(name).main(**kwargs)
    assert result and capsys.readouterr().out.strip()


def test_question_agnostic_copies_answer_alike():
    first, second = load("question_agnostic").main(context_tokens=400)
    assert first == second  # the deep-copied compressed cache is reusable, question after question
