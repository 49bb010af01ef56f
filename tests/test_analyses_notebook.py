"""The example notebook runs from top to bottom on a checkpoint (so it never rots), as
Jupyter runs it: in the notebook's own folder, with a CHECKPOINT relative to the
directory Jupyter was launched from; its attention view is labelled with the tokens of
the prompt it cached, and its figures are drawn inline."""

import html
import json
import os
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).parent.parent / "analyses" / "notebooks" / "explore_checkpoint.ipynb"
CACHED_PROMPT = "The cat sat on the mat. The cat sat on the"


def test_example_notebook_executes(tiny_model, tiny_checkpoint, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    repo = str(NOTEBOOK.parent.parent.parent)
    launched_from = tiny_checkpoint.parent.parent
    monkeypatch.setenv("PWD", str(launched_from))  # what the shell that started Jupyter passes on
    monkeypatch.setenv("CHECKPOINT", str(tiny_checkpoint.relative_to(launched_from)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("wrote" in o.get("text", "") for o in outputs)
    inline = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    frames = [page for page in inline if page.startswith("<iframe srcdoc=")]
    assert len(frames) == 1, "the figures are drawn inline, once"
    page = html.unescape(frames[0])
    views = [json.loads(props) for props in re.findall(r"CircuitsVis\.AttentionHeads, (\{.*?\})\);", page)]
    assert len(views) == tiny_model.cfg.n_layers
    labels = tiny_model.to_str_tokens(CACHED_PROMPT)
    for view in views:
        pattern_size = {len(view["attention"][0]), len(view["attention"][0][0])}
        assert pattern_size == {len(view["tokens"])}, "labels and pattern disagree in size"
        assert view["tokens"] == labels  # the prompt that was cached, not another one
