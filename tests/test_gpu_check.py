"""benchmarks/gpu_check.py in its reduced CPU mode, so the GPU check does not rot while no
GPU runs it: every row is produced, CUDA-only rows say so, and the exit code follows the rows."""

import json

from benchmarks import gpu_check

EXPECTED = {"train bf16": "ok", "train fp16+scaler": "skip", "compile": "skip", "torchrun x2": "skip",
            "resume 2->1": "skip", "generate": "ok", "syncs/step": "ok"}


def test_cpu_mode_runs_every_check(shakespeare_data, tmp_path, capsys):
    code = gpu_check.main(["--cpu", "--data", str(shakespeare_data), "--steps", "3", "--out", str(tmp_path / "runs"),
                           "--json", str(tmp_path / "rows.json")])
    rows = {r["check"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert {name: r["status"] for name, r in rows.items()} == EXPECTED, rows
    assert code == 0
    table = capsys.readouterr().out
    assert "reduced mode (--cpu)" in table and all(name in table for name in EXPECTED)
    assert rows["train bf16"]["values"]["tokens_per_s"] > 0 and rows["train bf16"]["values"]["mfu"] > 0
    assert rows["generate"]["values"]["tokens_equal"] == 8, "greedy tokens equal transformers'"
    visible = rows["syncs/step"]["values"]["visible"]
    assert visible >= 1 and visible == int(visible), "the loss is read each step, a whole number of times"


def test_a_failed_check_makes_the_exit_code_non_zero(monkeypatch, tmp_path, capsys):
    def broken(setup):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "CHECKS", [broken, gpu_check.train_fp16])
    assert gpu_check.main(["--cpu", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "broken" in out and "FAIL  RuntimeError: boom" in out and "1 failed: broken" in out
