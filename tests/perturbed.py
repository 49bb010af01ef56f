"""Random models whose biases and layer norms are not at their initial values (zeros and
ones would let a test pass with a bias or gain left out), shared by the parity, processing
and patching tests."""

import torch

from hooked_gpt2 import HookedGPT2


def perturb_biases_and_norms(model: HookedGPT2) -> HookedGPT2:
    """Biases drawn from N(0, 0.1) and layer-norm weights from N(1, 0.3), in place; returns ``model``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif ".ln" in name or name.startswith("ln_final"):
                p.normal_(1, 0.3)
    return model
