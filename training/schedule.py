"""The learning-rate schedule and the checkpoint schedule: pure functions of the step."""

import math


def get_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Learning rate for the update that takes the model from ``step`` to ``step + 1``.

    Linear warm-up from ~0 to ``lr`` over ``warmup_steps``, then ``constant``, or a
    ``cosine`` or ``linear`` decay reaching ``min_lr`` at ``max_steps``.

    >>> get_lr(0, lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100, schedule="cosine")
    0.1
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    assert schedule == "linear", f"unknown schedule {schedule!r}"
    return lr - (lr - min_lr) * progress


def checkpoint_steps(max_steps: int, every: int, log_spaced: bool = True) -> list[int]:
    """Pythia-style: step 0, then 1, 2, 4, 8, ... below ``every``, then every ``every``
    steps, and the last step.

    >>> checkpoint_steps(250, every=100)
    [0, 1, 2, 4, 8, 16, 32, 64, 100, 200, 250]
    """
    steps = {0, max_steps}
    if log_spaced:
        steps |= {2**i for i in range(max(1, every).bit_length()) if 2**i < every}
    steps |= set(range(every, max_steps + 1, every))
    return sorted(s for s in steps if s <= max_steps)
