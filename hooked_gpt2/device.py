"""The device a command runs on: ``auto`` is the first CUDA GPU when there is one, else the CPU.

Training, the analyses and ``python -m hooked_gpt2`` share this default, so the same command
uses a GPU where there is one.

>>> resolve_device("cpu")
device(type='cpu')
"""

import torch

from .config import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``name`` as a torch.device, ``auto`` made concrete."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
