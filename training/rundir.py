"""The run directory: its layout, and every reader and writer of it.

    RUN/
        config.json                      TrainConfig.to_dict() of the resolved run, plus "derived"
        metrics.jsonl, samples.jsonl     one JSON row per logged step / sampled generation
        checkpoints/step_0000100/
            config.json, model.safetensors   HookedGPT2.from_pretrained(this directory)
            state.json                   {"step", "tokens_seen", "train_loss", "val_loss"}
            resume/                      in the latest checkpoints only (keep_resume):
                optimizer.pt             optimizer state dict (torch.save; loaded weights_only)
                grad_scaler.pt           fp16 grad-scaler state, when one is used
                rng.pt                   each rank's RNG states, in rank order
                loader.json              data position; the LR schedule step is state.json's step
        analysis/                        what the analyses write about the run
        failed.json                      {"error"}: a study run that failed (e.g. a non-finite loss)
    STUDY/study.json, STUDY/<variant>/seed_<n>/    a study (training.study) of such runs

Training and the analyses both import this module; nothing else parses these files.
Every file is written atomically (``hooked_gpt2.atomic``): a checkpoint is written whole
as ``.step_0000100.tmp`` and renamed into place, so a crash mid-save leaves earlier
checkpoints as they were and no half-written one.

>>> [step for step, _ in list_checkpoints("runs/demo")][:4]  # doctest: +SKIP
[0, 1, 2, 4]
"""

import contextlib
import json
import re
import shutil
from pathlib import Path

import torch

from hooked_gpt2 import CheckpointError, HookedGPT2
from hooked_gpt2.atomic import atomic_path, atomic_write, temporary_path

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
CHECKPOINTS = "checkpoints"
ANALYSIS = "analysis"
STUDY = "study.json"
FAILED = "failed.json"
STEP_DIR = re.compile(r"^step_(\d{7,})$")
RESUME_FILES = {"optimizer": "optimizer.pt", "grad_scaler": "grad_scaler.pt", "rng": "rng.pt", "loader": "loader.json"}


# The run's config.
def read_config(run_dir: str | Path) -> dict:
    """``RUN/config.json`` as written by training (TrainConfig keys plus ``derived``)."""
    path = Path(run_dir) / CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir} is not a training run directory (no {CONFIG})") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); the run directory is damaged") from None


def has_config(run_dir: str | Path) -> bool:
    return (Path(run_dir) / CONFIG).is_file()


def write_config(run_dir: str | Path, config: dict, derived: dict) -> None:
    atomic_write(Path(run_dir) / CONFIG, json.dumps({**config, "derived": derived}, indent=2) + "\n")


# Logged rows.
def read_metrics(run_dir: str | Path, name: str = METRICS) -> list[dict]:
    """The rows of ``RUN/metrics.jsonl`` (or ``samples.jsonl``); none if the file does not
    exist. A half-written last line of a run in progress is skipped."""
    path = Path(run_dir) / name
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def has_metrics(run_dir: str | Path) -> bool:
    return (Path(run_dir) / METRICS).is_file()


def append_row(run_dir: str | Path, name: str, row: dict) -> None:
    with open(Path(run_dir) / name, "a") as f:
        f.write(json.dumps(row) + "\n")


def trim_metrics(run_dir: str | Path, step: int) -> None:
    """Drop rows past ``step`` (written before a crash, about to be redone on resume)."""
    for name in (METRICS, SAMPLES):
        path = Path(run_dir) / name
        if path.is_file():
            rows = [row for row in read_metrics(run_dir, name) if row["step"] <= step]
            atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))


# Checkpoints.
def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, sorted by step (temporary directories are not listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_resumable(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that holds resume state, or None."""
    resumable = [p for _, p in list_checkpoints(run_dir) if (p / "resume" / RESUME_FILES["loader"]).is_file()]
    return resumable[-1] if resumable else None


def make_checkpoints_dir(run_dir: str | Path) -> None:
    """Create ``RUN/checkpoints`` and remove half-written checkpoints left by a crash."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for p in root.glob(temporary_path("step_*").name):
        shutil.rmtree(p, ignore_errors=True)


def read_checkpoint_info(ckpt: str | Path) -> dict:
    """A checkpoint's ``state.json`` (step, tokens_seen, losses); {} if it has none."""
    try:
        return json.loads((Path(ckpt) / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def save_checkpoint(run_dir: str | Path, model: HookedGPT2, info: dict, resume: dict | None = None) -> Path:
    """Write checkpoint ``info["step"]`` atomically: the model, ``info`` as state.json, and
    ``resume`` (optimizer, grad_scaler or None, rng, loader) when given."""
    final = step_dir(run_dir, info["step"])
    with atomic_path(final) as tmp:
        model.save_pretrained(tmp)
        (tmp / "state.json").write_text(json.dumps(info, indent=2) + "\n")
        if resume is not None:
            r = tmp / "resume"
            r.mkdir()
            for key, name in RESUME_FILES.items():
                if name.endswith(".json"):
                    (r / name).write_text(json.dumps(resume[key]) + "\n")
                elif resume[key] is not None:
                    torch.save(resume[key], r / name)
    return final


def load_checkpoint(ckpt: str | Path, map_location="cpu") -> dict:
    """Everything ``save_checkpoint`` wrote: ``info``, the ``model`` state dict (by name),
    and the resume pieces (``grad_scaler`` None when the run had none)."""
    ckpt = Path(ckpt)
    r = ckpt / "resume"
    try:
        out = {"info": json.loads((ckpt / "state.json").read_text()),
               "model": HookedGPT2.from_pretrained(ckpt).state_dict()}
        for key, name in RESUME_FILES.items():
            if name.endswith(".json"):
                out[key] = json.loads((r / name).read_text())
            else:
                out[key] = torch.load(r / name, map_location=map_location, weights_only=True) \
                    if (r / name).is_file() or key != "grad_scaler" else None
        return out
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"cannot resume from {ckpt}: {e}") from None


def drop_old_resume_state(run_dir: str | Path, keep: int) -> None:
    """Keep resume state in only the ``keep`` newest checkpoints; model snapshots stay."""
    with_resume = [p for _, p in list_checkpoints(run_dir) if (p / "resume").is_dir()]
    for p in with_resume[:-keep]:
        shutil.rmtree(p / "resume")


def run_status(run_dir: str | Path) -> str:
    """``new``, ``finished`` (its final checkpoint exists), ``failed`` (``mark_failed``)
    or ``interrupted``."""
    if not has_config(run_dir):
        return "new"
    if read_config(run_dir)["max_steps"] in [step for step, _ in list_checkpoints(run_dir)]:
        return "finished"
    if (Path(run_dir) / FAILED).is_file():
        return "failed"
    return "interrupted" if latest_resumable(run_dir) is not None else "new"


def mark_failed(run_dir: str | Path, error: str) -> None:
    """Record that a run failed and why (a study skips it then, and comparisons report it)."""
    atomic_write(Path(run_dir) / FAILED, json.dumps({"error": error}, indent=2) + "\n")


def failure(run_dir: str | Path) -> str | None:
    """Why a run failed (``mark_failed``), or None."""
    try:
        return json.loads((Path(run_dir) / FAILED).read_text())["error"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


# Studies: a baseline and its variants, each with several seeds.
def study_run_dir(study_dir: str | Path, variant: str, seed: int) -> Path:
    return Path(study_dir) / variant / f"seed_{seed}"


def write_study(study_dir: str | Path, plan: dict) -> None:
    atomic_write(Path(study_dir) / STUDY, json.dumps(plan, indent=2) + "\n")


def read_study(study_dir: str | Path) -> dict | None:
    """A study directory's resolved plan, or None if ``study_dir`` is not one."""
    path = Path(study_dir) / STUDY
    return json.loads(path.read_text()) if path.is_file() else None
