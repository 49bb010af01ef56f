"""Pieces every analysis shares: turning prompts and answers into checked token ids,
checking layer and head indices, metrics, and batches of tokens from a data split.

Errors a user can cause raise ``AnalysisError`` (a ``ValueError``) with a message that
names the problem and the fix; the scripts print it as ``error: ...``.
"""

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from data_prep.reader import TokenDataset, load_manifest, manifest_vocab
from hooked_gpt2 import EOT_TOKEN
from hooked_gpt2.losses import next_token_loss

Metric = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]]


class AnalysisError(ValueError):
    """A request an analysis cannot answer (empty prompt, unknown layer, ...)."""


def prompt_tokens(model, prompt: str, prepend_bos: bool = True) -> Int[Tensor, "batch pos"]:
    """A prompt as ``[1 pos]`` token ids, refusing an empty prompt."""
    if not prompt or not prompt.strip():
        raise AnalysisError("the prompt is empty: pass some text, e.g. --prompt 'The cat sat on the mat'")
    tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)
    if tokens.shape[1] > model.cfg.n_ctx:
        raise AnalysisError(
            f"the prompt is {tokens.shape[1]} tokens, longer than the model's context of {model.cfg.n_ctx}"
        )
    return tokens


def single_token(model, answer: str | int) -> int:
    """The id of a one-token answer (a string such as ``" Paris"`` or an id)."""
    if isinstance(answer, int):
        ids = [answer]
    else:
        if not answer:
            raise AnalysisError("the answer is empty: give a single-token string such as ' Paris'")
        ids = model.tokenizer.encode_ordinary(answer)
    if len(ids) != 1:
        raise AnalysisError(
            f"the answer {answer!r} is {len(ids)} tokens, not one; choose a single-token answer "
            "(most common words need a leading space, e.g. ' Paris')"
        )
    if not 0 <= ids[0] < model.cfg.d_vocab:
        raise AnalysisError(f"answer token id {ids[0]} is outside the model's vocabulary of {model.cfg.d_vocab}")
    return ids[0]


def launch_dir_path(path: str | Path) -> Path:
    """``path`` as the user meant it: absolute as given; relative to the directory they
    launched from. A notebook's kernel runs in the notebook's own folder but inherits the
    environment of the shell that started Jupyter, whose ``PWD`` is that directory; the
    kernel's working directory is tried second. A path found in neither raises, naming both.

    >>> launch_dir_path("runs/demo/checkpoints/step_0001000")  # doctest: +SKIP
    PosixPath('/home/me/hooked-gpt2/runs/demo/checkpoints/step_0001000')
    """
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    bases = [Path(os.environ["PWD"])] if os.environ.get("PWD") else []
    bases += [base for base in [Path.cwd()] if base not in bases]
    for base in bases:
        if (base / path).exists():
            return base / path
    tried = " or ".join(str(base / path) for base in bases)
    raise AnalysisError(f"no {path} relative to the directory Jupyter was launched from: tried {tried}; "
                        "give an absolute path")


def check_layer(model, layer: int) -> int:
    n = model.cfg.n_layers
    if not isinstance(layer, int) or not -n <= layer < n:
        raise AnalysisError(f"unknown layer {layer}: this model has layers 0..{n - 1}")
    return layer % n


def check_head(model, layer: int, head: int) -> tuple[int, int]:
    layer = check_layer(model, layer)
    n = model.cfg.n_heads
    if not isinstance(head, int) or not -n <= head < n:
        raise AnalysisError(f"unknown head {head} in layer {layer}: this model has heads 0..{n - 1}")
    return layer, head % n


def parse_heads(model, text: str) -> list[tuple[int, int]]:
    """``"0.1,1.3"`` or ``"L0H1,L1H3"`` to checked (layer, head) pairs."""
    heads = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        cleaned = item.upper().replace("L", "").replace("H", ".")
        try:
            layer, head = (int(x) for x in cleaned.split("."))
        except ValueError:
            raise AnalysisError(f"cannot read head {item!r}: write heads as LAYER.HEAD, e.g. 0.1,1.3") from None
        heads.append(check_head(model, layer, head))
    return heads


def parse_layers(model, text: str | None) -> list[int]:
    """``"0,2"`` to checked layer indices; None or "all" means every layer."""
    if text is None or text.strip() == "all":
        return list(range(model.cfg.n_layers))
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise AnalysisError(f"cannot read layers {text!r}: write them as 0,1,2 or 'all'") from None
    return [check_layer(model, layer) for layer in layers]


def bos_token(model) -> int:
    """GPT-2's <|endoftext|> (its id in a compact vocabulary), or the last id for a model
    with a small synthetic vocabulary."""
    if model.cfg.vocab is not None:
        return model.tokenizer.bos_token_id
    return EOT_TOKEN if model.cfg.d_vocab > EOT_TOKEN else model.cfg.d_vocab - 1


# Metrics: functions of the logits returning a scalar.
def mean_loss(tokens: Int[Tensor, "batch pos"]) -> Metric:
    """Mean next-token cross-entropy of ``tokens``, as a metric on logits."""

    def metric(logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
        return next_token_loss(logits, tokens)

    return metric


def logit_diff(answer: int, wrong: int | None = None, pos: int = -1) -> Metric:
    """Logit of ``answer`` minus that of ``wrong`` at position ``pos``, averaged over the batch.

    >>> metric = logit_diff(answer=1, wrong=2)
    >>> float(metric(torch.tensor([[[0.0, 3.0, 1.0]]])))
    2.0
    """

    def metric(logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
        value = logits[:, pos, answer]
        if wrong is not None:
            value = value - logits[:, pos, wrong]
        return value.mean()

    # It reads only the last -pos positions: patching sweeps unembed only those (reads_last).
    metric.reads_last = -pos if pos < 0 else None
    return metric


def reads_last(metric: Metric) -> int | None:
    """How many final positions ``metric`` reads, where it says (``metric.reads_last``):
    logits at earlier positions need not be computed for it. None: it may read any."""
    return getattr(metric, "reads_last", None)


def check_data_vocab(model, data_dir: str | Path, name: str = "the model") -> None:
    """Raise unless the prepared data at ``data_dir`` holds ``model``'s token ids: GPT-2's
    for both, or the same compact vocabulary (``data_prep.compact``)."""
    data_vocab = manifest_vocab(load_manifest(Path(data_dir)))
    if data_vocab == model.cfg.vocab:
        return

    def what(vocab):
        return "GPT-2's token ids" if vocab is None else f"a compact vocabulary of {len(vocab):,} tokens"
    raise AnalysisError(f"{data_dir} holds {what(data_vocab)}, {name} reads {what(model.cfg.vocab)}: its losses "
                        "there would be meaningless; use data with the model's vocabulary (the data it trained on)")


def load_split_batch(
    data_dir: str | Path, split: str = "val", batch: int = 8, seq_len: int = 128, seed: int = 0
) -> Int[Tensor, "batch pos"]:
    """``batch`` random windows of ``seq_len`` tokens from one split of prepared data,
    read through ``data_prep.reader`` (manifest, every shard and the tokenizer checked)."""
    dataset = TokenDataset(data_dir, split)
    if len(dataset) < seq_len + 1:
        raise AnalysisError(f"the {split} split of {data_dir} holds {len(dataset)} tokens, fewer than "
                            f"--seq-len {seq_len}; choose a shorter --seq-len")
    starts = np.random.default_rng(seed).integers(0, len(dataset) - seq_len, size=batch)
    return torch.from_numpy(np.stack([dataset.read(int(s), seq_len) for s in starts]))
