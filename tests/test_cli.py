"""python -m hooked_gpt2: generation from a checkpoint, and one-line errors."""

import subprocess
import sys
from pathlib import Path

import torch

from hooked_gpt2 import GPT2Config, HookedGPT2

REPO = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hooked_gpt2", *args], cwd=REPO, capture_output=True, text=True)


def test_generates_from_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config(n_layers=1, d_model=32, n_heads=2, n_ctx=32)).eval()
    model.save_pretrained(tmp_path)
    result = run("--checkpoint", str(tmp_path), "--prompt", "Every effort", "--max-new-tokens", "5",
                 "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == model.generate("Every effort", max_new_tokens=5, temperature=0)


def test_user_errors_are_one_line(tmp_path):
    for args, message in [
        (("--checkpoint", str(tmp_path / "missing")), "no checkpoint directory"),
        (("--preset", "tiny", "--max-new-tokens", "1000"), "exceeds the context"),
        (("--prompt", ""), "prompt is empty"),
        (("--device", "gpu0"), "unknown device 'gpu0'"),
    ]:
        result = run(*args)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
        assert "Traceback" not in result.stderr


def test_the_model_runs_on_the_device_asked_for(tmp_path, monkeypatch, capsys):
    from hooked_gpt2 import __main__ as cli

    devices = []
    monkeypatch.setattr(HookedGPT2, "generate", lambda self, *args, **kwargs: devices.append(self.W_E.device) or "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["--max-new-tokens", "2", "--device", "meta"]) == 0  # meta: weights without storage
    assert cli.main(["--max-new-tokens", "2"]) == 0
    assert devices == [torch.device("meta"), torch.device("cpu")], "--device moves the model; auto is the CPU here"
    assert cli.parse_args([]).device == "auto"
