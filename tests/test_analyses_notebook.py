"""The example notebook runs from top to bottom on a checkpoint (so it never rots)."""

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).parent.parent / "analyses" / "notebooks" / "explore_checkpoint.ipynb"


def test_example_notebook_executes(tiny_checkpoint, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    repo = str(NOTEBOOK.parent.parent.parent)
    monkeypatch.setenv("CHECKPOINT", str(tiny_checkpoint))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": repo}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("wrote" in o.get("text", "") for o in outputs)
