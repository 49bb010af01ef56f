"""The analysis scripts: each writes report.html and results.json; user errors print
``error: ...`` and exit 2 without a traceback."""

import json
import subprocess
import sys

import pytest

from analyses import ablation, attention, dla, heads, logit_lens, patching

SHORT = ["--prompt", "The cat sat on the mat. The cat sat"]


@pytest.mark.parametrize("module,extra", [
    (logit_lens, SHORT + ["--site", "pre", "--top-k", "3"]),
    (attention, SHORT + ["--layers", "0,1"]),
    (ablation, SHORT + ["--heads", "0.1,1.2", "--reference-batch", "4"]),
    (heads, ["--seq-len", "8", "--batch", "2", "--text", "a b c a b c"]),
    (dla, SHORT + ["--answer", " on", "--wrong", " mat"]),
    (patching, ["--kinds", "resid_pre,head_out,pattern"]),
])
def test_script_writes_report_and_json(module, extra, tiny_checkpoint, tmp_path):
    assert module.main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), *extra]) == 0
    assert (tmp_path / "report.html").stat().st_size > 100_000
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["args"]["checkpoint"] == str(tiny_checkpoint)


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"analyses.{name}", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def corrupt_checkpoint(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("corrupt")
    (path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    return path


@pytest.mark.parametrize("case,args,message", [
    ("missing checkpoint", ["logit_lens", "--checkpoint", "/nonexistent/ckpt"], "no checkpoint directory"),
    ("corrupt checkpoint", ["logit_lens", "--checkpoint", "CORRUPT"], "corrupt"),
    ("empty prompt", ["logit_lens", "--prompt", ""], "prompt is empty"),
    ("different lengths", ["patching", "--clean", "one two", "--corrupted", "one two three four"], "same number of tokens"),
    ("multi-token answer", ["dla", "--answer", " antidisestablishmentarianism"], "not one"),
    ("unknown layer", ["attention", "--layers", "7"], "unknown layer 7"),
    ("unknown head", ["ablation", "--heads", "0.9", "--methods", "zero"], "unknown head 9"),
])
def test_user_errors_are_one_line_with_exit_code_2(case, args, message, tiny_checkpoint, corrupt_checkpoint, tmp_path):
    name, *rest = args
    if "--checkpoint" not in rest:
        rest += ["--checkpoint", str(tiny_checkpoint)]
    rest = [str(corrupt_checkpoint) if a == "CORRUPT" else a for a in rest]
    result = run_script(name, *rest, "--out", str(tmp_path / "out"))
    assert result.returncode == 2, (case, result.stderr)
    assert result.stderr.startswith("error: ") and message in result.stderr, (case, result.stderr)
    assert "Traceback" not in result.stderr
