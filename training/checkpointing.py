"""Training checkpoints: a model snapshot the analyses open, plus resume state.

    RUN/checkpoints/step_0000100/
        config.json, model.safetensors   HookedGPT2.from_pretrained(this directory)
        state.json                       {"step", "tokens_seen", "train_loss", "val_loss"}
        resume/                          in the latest checkpoints only (keep_resume):
            optimizer.pt                 optimizer state dict (torch.save; loaded weights_only)
            grad_scaler.pt               fp16 grad-scaler state, when one is used
            rng.pt                       every rank's RNG states
            loader.json                  data position; the LR schedule step is state.json's step

Each checkpoint is written whole into ``.step_0000100.tmp`` and renamed into place, so a
crash mid-save leaves earlier checkpoints as they were and no half-written one.
"""

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from hooked_gpt2 import CheckpointError, HookedGPT2
from hooked_gpt2.checkpoint import atomic_write_text  # noqa: F401  (re-exported for train.py)

STEP_DIR = re.compile(r"^step_(\d{7,})$")


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, sorted by step (temporary directories are not listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_resumable(run_dir: Path) -> Path | None:
    """The newest checkpoint that holds resume state, or None."""
    resumable = [p for _, p in list_checkpoints(run_dir) if (p / "resume" / "loader.json").is_file()]
    return resumable[-1] if resumable else None


def remove_temporaries(run_dir: Path) -> None:
    """Half-written checkpoints left by a crash during a save."""
    root = Path(run_dir) / "checkpoints"
    for p in root.glob(".step_*.tmp") if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")) + [path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(run_dir: Path, model: HookedGPT2, state: dict, resume: dict | None = None) -> Path:
    """Write checkpoint ``state["step"]`` atomically; ``resume`` holds optimizer,
    grad_scaler (or None), rng (one state per rank) and loader state dicts."""
    final = step_dir(run_dir, state["step"])
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    if resume is not None:
        r = tmp / "resume"
        r.mkdir()
        torch.save(resume["optimizer"], r / "optimizer.pt")
        if resume["grad_scaler"] is not None:
            torch.save(resume["grad_scaler"], r / "grad_scaler.pt")
        torch.save(_picklable_rng(resume["rng"]), r / "rng.pt")
        (r / "loader.json").write_text(json.dumps(resume["loader"]) + "\n")
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (an interrupt at a scheduled step): replace it
        old = final.with_name(f".{final.name}.old.tmp")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def _picklable_rng(states: list[dict]) -> list[dict]:
    # numpy's and Python's states hold tuples of ints and arrays: store them as tensors
    # and lists so torch.load(weights_only=True) can read them back.
    out = []
    for s in states:
        kind, keys, pos, has_gauss, cached = s["numpy"]
        out.append({
            "torch": s["torch"], "cuda": list(s["cuda"]),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": [s["python"][0], list(s["python"][1]), s["python"][2]],
        })
    return out


def _unpickle_rng(states: list[dict]) -> list[dict]:
    out = []
    for s in states:
        kind, keys, pos, has_gauss, cached = s["numpy"]
        out.append({
            "torch": s["torch"], "cuda": s["cuda"],
            "numpy": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached),
            "python": (s["python"][0], tuple(s["python"][1]), s["python"][2]),
        })
    return out


def drop_old_resume_state(run_dir: Path, keep: int) -> None:
    """Keep resume state in only the ``keep`` newest checkpoints; model snapshots stay."""
    with_resume = [p for _, p in list_checkpoints(run_dir) if (p / "resume").is_dir()]
    for p in with_resume[:-keep]:
        shutil.rmtree(p / "resume")


def load_resume(ckpt: Path, map_location="cpu") -> dict:
    """Everything ``save_checkpoint`` wrote, for continuing the run."""
    r = ckpt / "resume"
    try:
        return {
            "state": json.loads((ckpt / "state.json").read_text()),
            "model": HookedGPT2.from_pretrained(ckpt),
            "optimizer": torch.load(r / "optimizer.pt", map_location=map_location, weights_only=True),
            "grad_scaler": torch.load(r / "grad_scaler.pt", weights_only=True) if (r / "grad_scaler.pt").is_file() else None,
            "rng": _unpickle_rng(torch.load(r / "rng.pt", weights_only=True)),
            "loader": json.loads((r / "loader.json").read_text()),
        }
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"cannot resume from {ckpt}: {e}") from None
