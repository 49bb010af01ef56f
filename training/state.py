"""TrainState: everything that changes as a run trains, saved and restored as one.

``state_dict()`` / ``load_state_dict()`` are the only way in and out, for checkpoints
and resumption alike (torchtitan's ``Stateful``). Parameters are restored by name.

RNG states are per process: each rank keeps its CPU, NumPy and Python generators and
the CUDA generator of its own device only, so a run resumes on any number of GPUs. A
rank that did not exist when the run was saved (a larger world size) starts from a
generator derived from the run's seed and its rank: deterministic, and its own.

>>> state = TrainState(model, optimizer, scaler, loader, seed=1337)  # doctest: +SKIP
>>> saved = state.state_dict()                                       # doctest: +SKIP
>>> state.load_state_dict(saved)                                     # doctest: +SKIP
"""

import random
from dataclasses import dataclass

import numpy as np
import torch

from data_prep.reader import BatchLoader
from hooked_gpt2 import HookedGPT2


@dataclass
class TrainState:
    model: HookedGPT2
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: BatchLoader
    step: int = 0
    rank: int = 0
    seed: int = 0

    def state_dict(self) -> dict:
        """This process's state; ``rng`` is this process's generators (see ``rng_state``)."""
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state``; its ``rng`` is one process's (``rng_for_rank`` picks it from a
        checkpoint's list), or None for a fresh generator derived from the seed and rank."""
        self.model.load_state_dict(state["model"])  # by name; strict
        self.optimizer.load_state_dict(state["optimizer"])
        if state["grad_scaler"] is not None:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.loader.load_state_dict(state["loader"])
        self.step = state["step"]
        if state["rng"] is None:
            seed_rng(derived_seed(self.seed, self.rank))
        else:
            set_rng_state(state["rng"])


def rng_for_rank(saved: list[dict], rank: int) -> dict | None:
    """Rank ``rank``'s generators from a checkpoint's per-rank list; None for a rank the
    saved run did not have."""
    return saved[rank] if rank < len(saved) else None


def derived_seed(seed: int, rank: int) -> int:
    """The seed of a rank that joins a resumed run: distinct per rank and from the run's
    initial seeds (``seed + rank``), and the same every time."""
    return int(np.random.SeedSequence((seed % 2**64, rank, 1)).generate_state(1, np.uint64)[0])


def seed_rng(seed: int) -> None:
    torch.manual_seed(seed)  # the CPU and every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict:
    """This process's generators, in types ``torch.load(weights_only=True)`` reads back.
    CUDA: the current device's generator only (each rank drives one GPU)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(internal), gauss],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):  # checkpoints before per-device states held every device's
        cuda = cuda[torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.current_device() < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
