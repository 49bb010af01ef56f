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
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: torch sees no CUDA GPU here (a CPU-only build of torch, or no "
                              "driver); use --device cpu, or auto to take a GPU only where there is one")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA GPUs here, "
                              f"numbered from 0 (CUDA_VISIBLE_DEVICES decides which and how many)")
    return device
