"""training.train in separate processes: 2-process gloo DDP against 1 process with the same
global batch, and SIGTERM leaving a resumable checkpoint. Subprocesses run with timeouts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training import rundir
from training.config import TrainConfig
from training.mfu import flops_per_token
from training.train import main, train

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--preset", "tiny", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--n-ctx", "32",
        "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "2", "--eval-batches", "3", "--eval-batch-size", "4",
        "--log-every", "1", "--ckpt-every", "4", "--sample-tokens", "0", "--precision", "fp32", "--no-progress",
        "--no-tensorboard", "--peak-flops", "1e12"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_process_ddp_equals_one_process(shakespeare_data, tmp_path):
    common = ARGS + ["--data", str(shakespeare_data), "--max-steps", "5"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.train", *common, "--batch-size", "2", "--out", str(tmp_path / "ddp")]
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(common + ["--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    ddp, one = rows(tmp_path / "ddp"), rows(tmp_path / "one")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == list(range(6)), "rank 0 alone writes metrics"
    for a, b in zip(ddp, one):
        for key in ("train_loss", "val_loss", "grad_norm"):
            assert (a[key] is None) == (b[key] is None)
            if a[key] is not None:
                assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["derived"]["world_size"] == 2 and config["global_batch_tokens"] == 4 * 32
    # MFU: each process's tokens/s against one device's peak (--peak-flops 1e12), not the global tokens/s.
    fpt = flops_per_token(TrainConfig.from_dict(config).model_config(), config["seq_len"])
    trained = [r for r in ddp if r["tokens_per_s"] is not None]
    assert trained and all(r["mfu"] == pytest.approx(r["tokens_per_s"] / 2 * fpt / 1e12) for r in trained)
    names = lambda run: [p.name for p in (run / "checkpoints").iterdir()]  # noqa: E731
    assert sorted(names(tmp_path / "ddp")) == sorted(names(tmp_path / "one")) == [
        "step_0000000", "step_0000001", "step_0000002", "step_0000004", "step_0000005"]


def test_sigterm_saves_a_resumable_checkpoint_and_exits_cleanly(shakespeare_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.train", *ARGS, "--data", str(shakespeare_data), "--batch-size", "4",
           "--max-steps", "10000", "--schedule", "constant", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(rows(out)) >= 4):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM" in stderr and "stopped at step" in stdout + stderr
    ckpt = rundir.latest_resumable(out)
    step = json.loads((ckpt / "state.json").read_text())["step"]
    assert step == rows(out)[-1]["step"] >= 3
    # Continue to a few steps past the interrupt: the same losses as a run never stopped.
    saved = TrainConfig.from_file(out / "config.json")
    train(TrainConfig.from_dict({**saved.to_dict(), "resume": True, "max_steps": step + 2}))
    ref = train(TrainConfig.from_dict({**saved.to_dict(), "out": str(tmp_path / "ref"), "max_steps": step + 2}))
    losses = lambda run: [r["train_loss"] for r in rows(run)]  # noqa: E731
    assert losses(out) == losses(ref)


def test_a_dead_rank_brings_the_run_down_instead_of_hanging(shakespeare_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.train", *ARGS, "--data", str(shakespeare_data), "--batch-size", "2",
           "--max-steps", "10000", "--ddp-timeout-s", "30", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(rows(out)) >= 3):
            time.sleep(0.2)
        rank1 = [pid for pid in worker_pids(proc.pid) if "RANK=1" in environ(pid)]
        assert rank1, "found no rank-1 worker"
        os.kill(rank1[0], signal.SIGKILL)
        proc.communicate(timeout=120)  # a hang fails here; how fast it fails is for benchmarks
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def worker_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children]


def environ(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
