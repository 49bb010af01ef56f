"""Validation loss on a fixed set of batches, and sampled generations.

The validation batches are the first ``n_batches`` of the val split, read the same way
every time, so curves compare across runs and a later analysis can recompute a run's
validation loss from ``RUN/config.json`` alone:

>>> cfg = json.load(open("runs/demo/config.json"))                     # doctest: +SKIP
>>> batches = fixed_val_batches(cfg["data"], cfg["eval_batch_size"], cfg["seq_len"], cfg["eval_batches"])
>>> evaluate(HookedGPT2.from_pretrained("runs/demo/checkpoints/step_0000100"), batches)
"""

import json  # noqa: F401  (used in the docstring example)
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from data_prep.reader import BatchLoader, TokenDataset


def next_token_loss(model, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``tokens`` [batch, seq_len + 1].

    Calls ``model(...)`` (not ``model.loss``) so a DDP or compiled wrapper sees the forward.
    """
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


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
            with autocast() if autocast else _null():
                total += next_token_loss(model, batch.to(device)).item()
    finally:
        model.train(was_training)
    return total / len(batches)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def sample(model, prompt: str, max_new_tokens: int, *, temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
    """A sampled continuation of ``prompt``, from a private generator (the global RNG,
    which dropout and resumption depend on, is untouched)."""
    was_training = model.training
    model.eval()
    try:
        tokens = model.to_tokens(prompt)
        if hasattr(model, "generate"):
            out = model.generate(tokens, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
        else:
            out = _sample_loop(model, tokens, max_new_tokens, temperature, top_k, seed)
        return model.to_string(out[0, tokens.shape[1]:])
    finally:
        model.train(was_training)


def _sample_loop(model, tokens: Tensor, max_new_tokens: int, temperature: float, top_k: int, seed: int) -> Tensor:
    gen = torch.Generator(device=tokens.device).manual_seed(seed)
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -model.cfg.n_ctx:])[:, -1].float() / temperature
        top = torch.topk(logits, min(top_k, logits.shape[-1]))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens
