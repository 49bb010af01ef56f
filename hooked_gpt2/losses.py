"""Next-token cross-entropy: the one definition the model, training, fine-tuning and
analyses share."""

import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

IGNORE = -100  # a label that carries no loss (fine-tuning's prompt and padding targets)


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch tokens_pos"] | None = None,
    per_token: bool = False,
    *,
    labels: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, ""] | Float[Tensor, "batch pos"]:
    """Cross-entropy of ``logits[:, i]`` predicting ``tokens[:, i + 1]``, in float32.

    ``tokens`` may be the model's input (the last position then has no target and is
    dropped) or one token longer (inputs plus the final target, as training batches are).
    Or give ``labels`` instead: the targets already shifted (``labels[:, i]`` is what
    ``logits[:, i]`` predicts), with ``IGNORE`` where there is no loss; the mean is then
    over the other labels (per-token losses are 0 at ``IGNORE``).
    Returns the mean over all predictions, or ``[batch pos]`` with ``per_token``.

    >>> import torch
    >>> tokens = torch.tensor([[0, 1, 2]])
    >>> round(next_token_loss(torch.zeros(1, 3, 4), tokens).item(), 4)  # uniform over 4: log 4
    1.3863
    >>> round(next_token_loss(torch.zeros(1, 2, 4), labels=torch.tensor([[IGNORE, 2]])).item(), 4)
    1.3863
    """
    assert (tokens is None) != (labels is None), "next_token_loss takes tokens or labels, one of them"
    if labels is None:
        labels = tokens[:, 1 : min(logits.shape[1], tokens.shape[1] - 1) + 1]
    n = labels.shape[1]
    targets = labels.to(logits.device)
    losses = F.cross_entropy(logits[:, :n].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                             reduction="none" if per_token else "mean")
    return losses.view(targets.shape) if per_token else losses
