"""Which precision a run trains in, and the autocast that implements it.

``auto`` (the default) is bf16 where the hardware has it natively: the CPU, and CUDA GPUs of
compute capability 8.0 or later (Ampere: A100, A10, RTX 30xx, and everything since). Older
GPUs (T4, V100) emulate bf16 slowly, so there ``auto`` is fp16 autocast with a gradient
scaler, as nanoGPT and nanochat choose. Other devices (MPS, ...) train in fp32.

>>> resolve_precision("auto", torch.device("cpu"))
'bf16'
"""

import contextlib

import torch


def has_native_bf16(device: torch.device) -> bool:
    """bf16 tensor cores (CUDA capability >= 8.0) or the CPU, which autocasts bf16 natively."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu"


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` itself, or for ``auto`` the one chosen for ``device``."""
    if precision != "auto":
        return precision
    if has_native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def make_autocast(precision: str, device: torch.device):
    """A factory of autocast contexts for ``precision`` on ``device`` (fp32: no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[resolve_precision(precision, device)]
    return lambda: torch.autocast(device.type, dtype=dtype)
