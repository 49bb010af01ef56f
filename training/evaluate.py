"""Validation loss on a fixed set of batches, and sampled generations.

The validation batches are the first ``n_batches`` of the val split, read the same way
every time, so curves compare across runs and a later analysis can recompute a run's
validation loss from ``RUN/config.json`` alone:

    cfg = rundir.read_config("runs/demo")
    batches = fixed_val_batches(cfg["data"], cfg["eval_batch_size"], cfg["seq_len"], cfg["eval_batches"])
    evaluate(HookedGPT2.from_pretrained("runs/demo/checkpoints/step_0000100"), batches)  # 5.04
"""

import contextlib
from pathlib import Path

import torch
from torch import Tensor

from data_prep.reader import BatchLoader, TokenDataset
from hooked_gpt2.losses import next_token_loss


def fixed_val_batches(data_dir: str | Path, batch_size: int, seq_len: int, n_batches: int) -> list[Tensor]:
    """The first ``n_batches`` validation batches, each int64 [batch_size, seq_len + 1]."""
    loader = BatchLoader(TokenDataset(data_dir, "val"), batch_size, seq_len)
    return [loader.next_batch() for _ in range(n_batches)]


@torch.no_grad()
def evaluate(model, batches: list[Tensor], autocast=None) -> float:
    """Mean loss of ``model`` over ``batches`` in eval mode; the model's mode is restored.

    ``autocast`` is an optional context-manager factory (the run's precision).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        total = 0.0
        for batch in batches:
            with autocast() if autocast else contextlib.nullcontext():
                batch = batch.to(device)
                total += next_token_loss(model(batch[:, :-1]), batch).item()
    finally:
        model.train(was_training)
    return total / len(batches)


@torch.no_grad()
def sample(model, prompt: str, max_new_tokens: int, *, temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
    """A sampled continuation of ``prompt``, from a private generator (the global RNG,
    which dropout and resumption depend on, is untouched)."""
    was_training = model.training
    model.eval()
    try:
        tokens = model.to_tokens(prompt)
        out = model.generate(tokens, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
        return model.to_string(out[0, tokens.shape[1]:])
    finally:
        model.train(was_training)

