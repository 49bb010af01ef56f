"""docs/ecosystem.md's SAELens example runs as it is written, offline."""

import re
from pathlib import Path

import pytest

pytest.importorskip("sae_lens")
DOC = Path(__file__).resolve().parents[1] / "docs" / "ecosystem.md"


def test_the_saelens_training_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    example = next(block for block in blocks if "LanguageModelSAETrainingRunner" in block)
    exec(compile(example, f"{DOC}:saelens-example", "exec"), {})
    assert capsys.readouterr().out.strip().endswith("torch.Size([4, 16, 64])")
