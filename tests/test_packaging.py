"""pyproject.toml: the declared torch floor is the oldest torch with every API the code
calls, read from the package metadata; TOML parsing works without tomllib (Python 3.10)."""

import builtins
import importlib.metadata
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# torch APIs the code calls that older releases lack: (attribute path, first torch with it,
# a string that marks its use in the source). The floor must be the newest of these.
NEEDED = [
    ("nn.utils.get_total_norm", (2, 6), "get_total_norm("),
    ("nn.utils.clip_grads_with_norm_", (2, 6), "clip_grads_with_norm_("),
    ("compiler.is_compiling", (2, 3), "torch.compiler.is_compiling("),
    ("amp.GradScaler", (2, 3), "torch.amp.GradScaler("),
]


def torch_floor(requirements: list[str]) -> tuple[int, ...]:
    (spec,) = [r for r in requirements if re.match(r"torch\b", r) and "extra ==" not in r]
    match = re.search(r">=\s*([\d.]+)", spec)
    assert match, f"torch has no floor in {spec!r}"
    return tuple(int(x) for x in match.group(1).split("."))


def source_text() -> str:
    return "\n".join(p.read_text() for pkg in ("hooked_gpt2", "training", "analyses", "data_prep")
                     for p in (REPO / pkg).rglob("*.py"))


def test_the_torch_floor_is_what_the_code_needs():
    from training.config import tomllib

    declared = torch_floor(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    code = source_text()
    for path, since, marker in NEEDED:
        assert marker in code, f"{path} is no longer used: drop it from NEEDED and lower the floor if it allows"
        obj = torch
        for part in path.split("."):
            obj = getattr(obj, part)  # the installed torch has it (the table names real APIs)
    assert declared == max(since for _, since, _ in NEEDED)


def test_the_installed_metadata_declares_the_same_floor():
    dist = importlib.metadata.distribution("hooked-gpt2")
    origin = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    if origin.removeprefix("file://").rstrip("/") != str(REPO):
        pytest.skip(f"hooked-gpt2 is installed from {origin or 'elsewhere'}, not this checkout")
    assert torch_floor(dist.requires) == max(since for _, since, _ in NEEDED)


def test_config_reads_toml_through_tomli_where_tomllib_is_missing(monkeypatch, tmp_path):
    pytest.importorskip("tomli")
    real_import = builtins.__import__

    def no_tomllib(name, *args, **kwargs):  # Python 3.10 has no tomllib
        if name == "tomllib":
            raise ModuleNotFoundError("No module named 'tomllib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tomllib)
    monkeypatch.delitem(sys.modules, "tomllib", raising=False)
    # A separate copy of training/config.py, so the imported module stays as it is.
    spec = importlib.util.spec_from_file_location("config_without_tomllib", REPO / "training" / "config.py")
    config = importlib.util.module_from_spec(spec)
    config.__package__ = "training"  # for its relative imports
    spec.loader.exec_module(config)
    assert config.tomllib.__name__ == "tomli"
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny"\nmax_steps = 3\n[model]\nd_model = 32\n')
    assert config.read_config_file(path) == {"preset": "tiny", "max_steps": 3, "model": {"d_model": 32}}
