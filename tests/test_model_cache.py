"""The converted-model cache: a conversion's files readable by every user, a killed run's leftovers removed by a
later load, a folder that is not an adakv cache refused with what to do. The GGUF reading is faked (the real
conversions run in test_smollm2.py / test_gemma3.py)."""

from __future__ import annotations

import os
import stat
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import transformers

import adakv.gguf_convert as gguf_convert
import adakv.models as models
from adakv.gguf_convert import COMPLETE_MARKER, GGUFModel, convert, is_complete, remove_stale

pytestmark = pytest.mark.fast

SPEC = GGUFModel("Fake", "fake-model", "fake.gguf", ("fake-package",))


class _Saved:
    """What from_pretrained returns here: save_pretrained writes its file private (0600), as safetensors does."""

    hf_quantizer = None

    def eval(self):
        return self

    def __init__(self, name: str):
        self.name, self.config = name, type("Config", (), {})()

    def save_pretrained(self, folder) -> None:
        path = Path(folder) / self.name
        path.write_text("{}")
        os.chmod(path, 0o600)


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    @contextmanager
    def gguf_path(spec, cache_dir):
        yield tmp_path / "package" / spec.gguf_file

    monkeypatch.setattr(gguf_convert, "package_dir", lambda spec: tmp_path / "package")
    monkeypatch.setattr(gguf_convert, "gguf_path", gguf_path)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: _Saved("config.json"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _Saved("tokenizer.json"))


def _leftover(cache_dir: Path, age_s: float) -> Path:
    stale = cache_dir.parent / f".{cache_dir.name}.tmp-{int(age_s)}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("half written")
    then = time.time() - age_s
    os.utime(stale, (then, then))
    return stale


def test_a_conversion_is_readable_by_every_user(fake_gguf, tmp_path):
    cache_dir = tmp_path / "root" / "fake-model"
    convert(SPEC, cache_dir)
    assert is_complete(cache_dir)
    for name in ("config.json", "tokenizer.json", COMPLETE_MARKER):
        assert stat.S_IMODE((cache_dir / name).stat().st_mode) == 0o644, name  # safetensors wrote 0600
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o755


def test_a_later_load_removes_a_killed_runs_old_leftovers(fake_gguf, tmp_path, monkeypatch):
    """A killed conversion leaves its temporary folder; the rerun completes the cache, and every later load (not only
    a conversion, which no longer runs) removes leftovers older than an hour; a younger one may be converting."""
    cache_dir = tmp_path / "root" / "fake-model"
    convert(SPEC, cache_dir)
    old, young = _leftover(cache_dir, 7200), _leftover(cache_dir, 60)
    monkeypatch.setattr(models, "model_spec", lambda name: SPEC)
    model, _ = models.load_model("fake", cache_dir=cache_dir)  # complete: loaded, not converted
    assert isinstance(model, _Saved) and not old.exists() and young.exists()
    remove_stale(cache_dir, age_s=0)
    assert not young.exists()


def test_a_folder_that_is_not_an_adakv_cache_is_refused_with_what_to_do(fake_gguf, tmp_path):
    cache_dir = tmp_path / "foreign"
    cache_dir.mkdir()
    (cache_dir / "config.json").write_text("{}")  # a checkpoint saved by someone else: no completion marker
    with pytest.raises(FileExistsError, match="ADAKV_CACHE_DIR.*--model DIR"):
        convert(SPEC, cache_dir)
    assert (cache_dir / "config.json").is_file()  # never deleted


def test_the_harness_says_what_to_do_about_a_foreign_cache_folder(tmp_path, monkeypatch, capsys):
    from adakv.eval.cli import main

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    monkeypatch.setenv("ADAKV_CACHE_DIR", str(foreign))
    for extra in ([], ["--random-weights"]):  # a traceback before, from two places
        with pytest.raises(SystemExit):
            main(["speed", "--model", "smollm2", "--lengths", "64", "--out", str(tmp_path / "out"), *extra])
        assert "is not an adakv model cache" in capsys.readouterr().err
