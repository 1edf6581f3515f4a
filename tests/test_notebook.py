"""examples/walkthrough.ipynb runs top to bottom (it asserts its own results), so it cannot rot."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from traitlets import default

NOTEBOOK = Path(__file__).parent.parent / "examples" / "walkthrough.ipynb"
# Per cell. Alone on 2 CPU cores the whole notebook takes ~65 s (its slowest cell ~45 s), plus ~20-45 s on a fresh
# machine where load_smollm2() first dequantizes the GGUF file; next to another torch process it can be 10x slower.
CELL_TIMEOUT_S = 1200


class SameInterpreterKernelManager(AsyncKernelManager):
    """Starts "python3" as ipykernel's built-in spec, i.e. with ``sys.executable``.

    An installed kernel.json (a venv's share/jupyter, ~/.local/share/jupyter) runs a bare ``python`` found on PATH,
    which is another interpreter when pytest runs as ``/some/venv/bin/python -m pytest`` without activating the venv.
    """

    @default("kernel_spec_manager")
    def _kernel_spec_manager_default(self) -> KernelSpecManager:
        return KernelSpecManager(parent=self, kernel_dirs=[])


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_committed_without_outputs():
    nb = read_notebook()
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "clear the notebook's outputs before committing"


def test_kernel_runs_in_this_interpreter():
    assert SameInterpreterKernelManager(kernel_name="python3").kernel_spec.argv[0] == sys.executable


def test_walkthrough_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")  # no GUI backend, ever; the notebook itself plots inline
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    nb = read_notebook()
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        kernel_manager_class=SameInterpreterKernelManager,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails, assertions included
    print(f"walkthrough.ipynb executed in {time.perf_counter() - start:.1f} s")

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert sum("image/png" in out.get("data", {}) for out in outputs) >= 2, "both figures rendered inline"

    (summary_cell,) = [cell for cell in nb.cells if "summary" in cell.metadata.get("tags", [])]
    summary = json.loads("".join(out.text for out in summary_cell.outputs if out.output_type == "stream"))
    assert summary["one_liner_correct"] is True
    assert summary["one_liner_kv_ratio"] < 0.3
    assert summary["layers_with_uneven_heads"] > 0
    assert int(summary["questions_correct"].split("/")[0]) >= 1
    assert summary["comparison_correct"]["full@1.0"] > summary["comparison_samples"] // 2
    assert len(summary["comparison_correct"]) > 1  # the full cache and at least one method were compared
