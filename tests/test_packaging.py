"""The wheel holds every subpackage: setuptools installs only the packages pyproject.toml lists (an editable
install hides a missing one, a `pip install adakv` does not)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.fast
def test_every_subpackage_is_listed_in_pyproject():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    dirs = tool["package-dir"]
    assert dirs["adakv.kernels"] == "kernels"
    found = {
        ".".join((name, *init.parent.relative_to(ROOT / where).parts))
        for name, where in dirs.items()
        for init in (ROOT / where).rglob("__init__.py")
    }
    assert found == listed, (
        f"pyproject.toml [tool.setuptools] packages: missing {found - listed}, stale {listed - found}"
    )
