"""Training state through public behaviour (the command line, ``train(cfg)``, the run
directory and its checkpoint files): DDP resume with dropout, a crash inside the real
checkpoint save, refused setting changes on resume, the learning-rate schedule as logged,
``--max-tokens`` rounding, ``--overwrite``, and the demo's documented shape."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hooked_gpt2 import GPT2Config, HookedGPT2
from training import rundir
from training.precision import resolve_precision
from training.config import DEMO_VOCAB, TrainConfig, config_from_args, default_data
from training.schedule import checkpoint_steps, get_lr
from training.train import main, train

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--preset", "tiny", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--n-ctx", "32",
        "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", "2", "--eval-every", "100", "--eval-batches", "1",
        "--eval-batch-size", "2", "--log-every", "1", "--ckpt-every", "100", "--sample-tokens", "0",
        "--precision", "fp32", "--no-progress", "--no-tensorboard", "--peak-flops", "1e12"]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in rows(run) if r["train_loss"] is not None]


def weights(ckpt: Path) -> dict:
    return HookedGPT2.from_pretrained(ckpt).state_dict()


# train(cfg, stop_after=N) under torchrun: stops after step N as an interrupt would.
LAUNCHER = textwrap.dedent("""
    import json, sys
    from training.config import config_from_args
    from training.train import train
    argv, stop_after = json.loads(sys.argv[1])
    train(config_from_args(argv), stop_after=stop_after)
""")


def test_ddp_resume_with_dropout_equals_an_uninterrupted_run_bitwise(shakespeare_data, tmp_path):
    common = ARGS + ["--data", str(shakespeare_data), "--batch-size", "2", "--max-steps", "6", "--dropout", "0.2"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    runs = [(common + ["--out", str(whole)], None), (common + ["--out", str(part)], 3),
            (common + ["--out", str(part), "--resume"], None)]
    (tmp_path / "launch.py").write_text(LAUNCHER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for run in runs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(tmp_path / "launch.py"), json.dumps(run)]
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((part / "config.json").read_text())["derived"]["world_size"] == 2
    assert [r["step"] for r in rows(part)] == list(range(7)), "the resumed run redoes nothing and skips nothing"
    assert train_losses(part) == train_losses(whole), "every rank's dropout and data continue exactly"
    a, b = weights(whole / "checkpoints" / "step_0000006"), weights(part / "checkpoints" / "step_0000006")
    assert all(torch.equal(a[k], b[k]) for k in a)


def small_cfg(data, out, **overrides) -> TrainConfig:
    cfg = config_from_args(ARGS + ["--data", str(data), "--out", str(out), "--batch-size", "2", "--max-steps", "6",
                                   "--ckpt-every", "4"])
    return TrainConfig.from_dict({**cfg.to_dict(), **overrides})


def fail_at_step_4(real):
    """``real`` (os.rename or os.replace), failing like a full disk or a kill when it
    moves anything into step 4's checkpoint or moves the checkpoint into place."""

    def failing(*args, **kwargs):
        paths = [Path(a) for a in args[:2] if isinstance(a, (str, os.PathLike))]
        if any("step_0000004" in p.parts or (p.name == "step_0000004") for p in paths):
            raise OSError("simulated crash during the save of step 4")
        return real(*args, **kwargs)

    return failing


@pytest.mark.parametrize("target", ["rename", "torch.save"])
def test_a_crash_inside_save_checkpoint_leaves_no_partial_step_and_earlier_ones_load(
    shakespeare_data, tmp_path, monkeypatch, target
):
    """The real save, failing at its last rename or in the middle of writing its files."""
    cfg = small_cfg(shakespeare_data, tmp_path / "run")
    if target == "torch.save":
        real = torch.save

        def failing(obj, f, *args, **kwargs):  # the resume files come after the weights
            if ".step_0000004" in str(f) or "step_0000004" in Path(f).parts:
                raise OSError("simulated crash while writing step 4's resume state")
            return real(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", failing)
    else:  # whichever of the two the save uses to put files and directories in place
        monkeypatch.setattr(os, "rename", fail_at_step_4(os.rename))
        monkeypatch.setattr(os, "replace", fail_at_step_4(os.replace))
    with pytest.raises(OSError, match="simulated crash"):
        train(cfg)
    monkeypatch.undo()
    checkpoints = tmp_path / "run" / "checkpoints"
    complete = [p.name for p in checkpoints.iterdir() if p.name.startswith("step_")]
    assert sorted(complete) == ["step_0000000", "step_0000001", "step_0000002"], complete
    for step, path in rundir.list_checkpoints(tmp_path / "run"):
        HookedGPT2.from_pretrained(path)
        assert json.loads((path / "state.json").read_text())["step"] == step
    # Resuming continues from step 2 and cleans up what the crash left.
    train(TrainConfig.from_dict({**cfg.to_dict(), "resume": True}))
    assert not [p for p in checkpoints.iterdir() if not p.name.startswith("step_")]
    assert [r["step"] for r in rows(tmp_path / "run")] == list(range(7))


def test_resume_refuses_changed_settings_in_one_line(shakespeare_data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ARGS + ["--data", str(shakespeare_data), "--out", str(out), "--batch-size", "2", "--max-steps", "4"]
    train(config_from_args(argv), stop_after=1)
    for flag, value in (("--lr", "1e-2"), ("--seed", "7"), ("--dropout", "0.3")):
        assert main(argv + ["--resume", flag, value]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "differ from the run's config.json" in err and "Traceback" not in err
        assert flag.strip("-").replace("-", "_") in err or "model" in err, err
    assert main(argv + ["--resume", "--max-steps", "5"]) == 0, "a longer run is an allowed change"
    assert rows(out)[-1]["step"] == 5


def test_logged_learning_rate_follows_the_schedule_formula(shakespeare_data, tmp_path):
    lr, min_lr, warmup, max_steps = 3e-3, 3e-4, 2, 7
    run = train(small_cfg(shakespeare_data, tmp_path / "run", max_steps=max_steps, schedule="cosine"))
    logged = rows(run)[1:]
    assert len(logged) == max_steps
    for row in logged:  # row s logs the rate of the update from step s - 1 to s
        s = row["step"] - 1
        if s < warmup:
            expected = lr * (s + 1) / warmup
        else:
            expected = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (max_steps - warmup)))
        assert row["lr"] == pytest.approx(expected, rel=1e-9), s


@pytest.mark.parametrize("step, cosine, linear", [
    (0, 0.1, 0.1), (4, 0.5, 0.5), (9, 1.0, 1.0), (10, 1.0, 1.0), (35, 0.1 + 0.9 * (2 + 2 ** 0.5) / 4, 0.775),
    (60, 0.55, 0.55), (85, 0.1 + 0.9 * (2 - 2 ** 0.5) / 4, 0.325), (110, 0.1, 0.1), (500, 0.1, 0.1),
])
def test_schedule_at_several_points(step, cosine, linear):
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert get_lr(step, schedule="cosine", **kw) == pytest.approx(cosine, rel=1e-12)
    assert get_lr(step, schedule="linear", **kw) == pytest.approx(linear, rel=1e-12)
    assert get_lr(step, schedule="constant", **kw) == pytest.approx(0.1 * (step + 1) if step < 10 else 1.0)


def test_max_tokens_rounds_up_to_whole_steps_as_its_help_says(shakespeare_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        config_from_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "ceil(max_tokens / global_batch_tokens)" in help_text
    out = tmp_path / "run"
    # 4 sequences x 32 tokens = 128 tokens a step: 300 tokens is 2.3 steps, rounded up to 3.
    argv = ARGS + ["--data", str(shakespeare_data), "--out", str(out), "--batch-size", "4", "--max-tokens", "300"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["max_steps"] == 3 and config["global_batch_tokens"] == 128
    assert rows(out)[-1]["step"] == 3 and rows(out)[-1]["tokens_seen"] == 384
    assert main(argv[:-1] + ["256", "--overwrite"]) == 0, "an exact multiple is not rounded"
    assert json.loads((out / "config.json").read_text())["max_steps"] == 2


def test_overwrite_deletes_the_old_run(shakespeare_data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ARGS + ["--data", str(shakespeare_data), "--out", str(out), "--batch-size", "2", "--max-steps", "1"]
    assert main(argv) == 0
    stale = [out / "notes.txt", out / "checkpoints" / "step_0000099" / "state.json", out / "analysis" / "old.html"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("from an earlier run")
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert all(p.exists() for p in stale), "without --overwrite nothing is touched"
    assert main(argv + ["--overwrite"]) == 0
    assert not any(p.exists() for p in stale)
    assert not (out / "checkpoints" / "step_0000099").exists() and not (out / "analysis").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000000", "step_0000001"]


def test_the_demo_shape_in_the_readme_is_train_configs_defaults():
    """The README's numbers for the demo are read from TrainConfig() and its preset."""
    text = " ".join((REPO / "README.md").read_text().split())
    cfg = TrainConfig()
    mcfg: GPT2Config = cfg.model_config()
    seq_len = cfg.seq_len or mcfg.n_ctx
    step_tokens = cfg.global_batch_tokens or cfg.batch_size * seq_len
    demo = re.search(r"The demo trains a (\d+)-layer attention-only transformer \(d_model (\d+), (\d+) heads, (\d+) "
                     r"positions, (\w+) positions, (\w+)\) for ([\d,]+) steps of ([\d,]+) tokens, about ([\d.]+)M tokens, "
                     r"in which ([\d.]+) of the sequences start with a repeated span", text)
    assert demo, "README.md no longer states the demo's shape in the expected sentence; update this test with it"
    n_layers, d_model, n_heads, n_ctx, positional, precision, steps, tokens, millions, repeats = demo.groups()
    assert (int(n_layers), int(d_model), int(n_heads), int(n_ctx)) == (mcfg.n_layers, mcfg.d_model, mcfg.n_heads, mcfg.n_ctx)
    assert mcfg.attn_only and positional == mcfg.positional and float(repeats) == cfg.repeat_fraction
    assert precision == resolve_precision(cfg.precision, torch.device("cpu"))  # the main job runs on the CPU
    assert int(steps.replace(",", "")) == cfg.max_steps and int(tokens.replace(",", "")) == step_tokens
    assert float(millions) == pytest.approx(cfg.max_steps * step_tokens / 1e6, rel=0.1)
    recipe = re.search(r"It reads the corpus over its ([\d,]+)-token compact vocabulary .*? with (\d+) warm-up steps and "
                       r"a (\w+) decay of the learning rate from ([\d.e-]+) to ([\d.e-]+),", text)
    assert recipe, "README.md no longer states the demo's vocabulary and schedule in the expected sentence"
    vocab, warmup, schedule, lr, min_lr = recipe.groups()
    assert (int(vocab.replace(",", "")), None) == (DEMO_VOCAB, cfg.data) and default_data("demo")[1] == DEMO_VOCAB
    assert (int(warmup), schedule, float(lr), float(min_lr)) == (cfg.warmup_steps, cfg.schedule, cfg.lr, cfg.min_lr)
    assert cfg.data_order_seed is not None and "in a shuffled order" in text
    saves = re.search(r"saving checkpoints at steps ([\d, .]+?) and then every (\d+)", text)
    assert saves, "README.md no longer states the demo's checkpoint steps"
    listed = [int(s) for s in re.findall(r"\d+", saves.group(1))]
    steps_saved = checkpoint_steps(cfg.max_steps, cfg.ckpt_every, cfg.ckpt_log_spaced)
    assert int(saves.group(2)) == cfg.ckpt_every
    assert listed[:3] == steps_saved[:3] and listed[-1] == max(s for s in steps_saved if s < cfg.ckpt_every)
    assert f"step_{cfg.max_steps:07d}" in text, "the README's checkpoint paths name the demo's last step"
