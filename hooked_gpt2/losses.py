"""Next-token cross-entropy: the one definition the model, training and analyses share."""

import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch tokens_pos"], per_token: bool = False
) -> Float[Tensor, ""] | Float[Tensor, "batch pos"]:
    """Cross-entropy of ``logits[:, i]`` predicting ``tokens[:, i + 1]``, in float32.

    ``tokens`` may be the model's input (the last position then has no target and is
    dropped) or one token longer (inputs plus the final target, as training batches are).
    Returns the mean over all predictions, or ``[batch pos]`` with ``per_token``.

    >>> import torch
    >>> tokens = torch.tensor([[0, 1, 2]])
    >>> round(next_token_loss(torch.zeros(1, 3, 4), tokens).item(), 4)  # uniform over 4: log 4
    1.3863
    """
    n = min(logits.shape[1], tokens.shape[1] - 1)
    targets = tokens[:, 1 : n + 1].to(logits.device)
    losses = F.cross_entropy(logits[:, :n].flatten(0, 1).float(), targets.flatten(), reduction="none" if per_token else "mean")
    return losses.view(targets.shape) if per_token else losses
