"""What TransformerLens notebooks import from ``transformer_lens.utils``, for the same
import line to work here: ``from hooked_gpt2 import utils; utils.get_act_name("k", 1)``."""

from .cache import get_act_name, slice_pos
from .losses import next_token_loss


def lm_cross_entropy_loss(logits, tokens, attention_mask=None, per_token: bool = False):
    """TransformerLens's ``utils.lm_cross_entropy_loss``: the mean next-token loss of
    ``logits`` for ``tokens`` (``[batch pos-1]`` with ``per_token``)."""
    if attention_mask is not None:
        raise ValueError("attention_mask is not supported: slice off the padding, or mask per_token losses")
    return next_token_loss(logits, tokens, per_token)


def to_numpy(tensor):
    """A tensor (or list, or number) as a NumPy array, off the graph and on the CPU."""
    import numpy as np
    import torch

    if isinstance(tensor, torch.Tensor):
        return tensor.detach().cpu().numpy()
    return np.asarray(tensor)


__all__ = ["get_act_name", "lm_cross_entropy_loss", "slice_pos", "to_numpy"]
