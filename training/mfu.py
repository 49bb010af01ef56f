"""Model FLOPs utilisation: the FLOPs a step needs against what the hardware can do.

MFU is per device: the tokens one process trains per second against one device's peak
(under torchrun the global tokens/s divided by ``world_size``, nanochat's convention).
"""

import re
import time

import torch

TFLOPS = 1e12

# Dense (no 2:4 sparsity) peak tensor-core FLOP/s with fp32 accumulation, from the vendors'
# data sheets; "fp32" is the TF32 tensor-core figure (what fp32 matmuls run at with TF32 on),
# or the plain FP32 figure on GPUs without TF32. A GPU with no native bf16 has no "bf16" entry.
# Sources (NVIDIA data sheets and architecture white papers):
#   A100: nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
#   H100 SXM / PCIe / NVL, H200 SXM / NVL: nvidia.com/en-us/data-center/h100/ and /h200/ (the data
#     sheets give sparse figures marked "*"; dense is half)
#   L4: nvidia.com/en-us/data-center/l4/ ; L40S: nvidia.com/en-us/data-center/l40s/ ; L40: .../l40/
#   RTX 3090: NVIDIA Ampere GA102 GPU Architecture white paper, table 9 (FP16/BF16 tensor, FP32 accumulate)
#   RTX 4090: NVIDIA Ada GPU Architecture white paper, table 2 (FP16/BF16 tensor, FP32 accumulate)
#   A10: nvidia.com/en-us/data-center/products/a10-gpu/ ; RTX A6000: nvidia.com/en-us/design-visualization/rtx-a6000/
#   T4: nvidia.com/en-us/data-center/tesla-t4/ (mixed-precision FP16 65, FP32 8.1)
#   V100: images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf
#     (SXM2 125 / PCIe 112 tensor; FP32 15.7 / 14)
# Each pattern is matched against the whole name as torch.cuda.get_device_name() returns it
# (e.g. "NVIDIA H100 PCIe", "Tesla V100-SXM2-16GB"): word boundaries keep "L4" off an L40S and
# "A10" off an A100, and the first matching row wins, so variants come before their family.
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    (r"\bH100\b.*\bNVL\b", {"bf16": 835.5, "fp16": 835.5, "fp32": 417.5}),
    (r"\bH100\b.*\bPCIe\b", {"bf16": 756.5, "fp16": 756.5, "fp32": 378.0}),
    (r"\bH100\b", {"bf16": 989.5, "fp16": 989.5, "fp32": 494.5}),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"\bH200\b.*\bNVL\b", {"bf16": 835.5, "fp16": 835.5, "fp32": 417.5}),
    (r"\bH200\b", {"bf16": 989.5, "fp16": 989.5, "fp32": 494.5}),
    (r"\bA100\b", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),  # 40 and 80 GB, SXM4 and PCIe
    (r"\bL40S\b", {"bf16": 362.05, "fp16": 362.05, "fp32": 183.0}),
    (r"\bL40\b", {"bf16": 181.05, "fp16": 181.05, "fp32": 90.5}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0}),
    (r"\bRTX 4090\b", {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}),
    (r"\bRTX 3090\b(?! Ti)", {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6}),
    (r"\bRTX A6000\b", {"bf16": 154.8, "fp16": 154.8, "fp32": 77.4}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5}),
    (r"\bT4\b", {"fp16": 65.0, "fp32": 8.1}),
    (r"\bV100\b.*\bPCIE\b", {"fp16": 112.0, "fp32": 14.0}),
    (r"\bV100\b", {"fp16": 125.0, "fp32": 15.7}),  # SXM2
]


def gpu_peak(name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of the GPU called ``name`` at ``precision``, or None if unknown.

    >>> gpu_peak("NVIDIA L40S", "bf16") / 1e12
    362.05
    """
    for pattern, peaks in GPU_PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return peaks[precision] * TFLOPS if precision in peaks else None
    return None


def flops_per_token(mcfg, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's estimate: 6 per matmul weight (forward and
    backward) plus attention's 12 * n_layers * n_heads * d_head * seq_len. The unembedding
    is counted (it is a matmul even when tied); the embedding lookups are not."""
    matmul_params = mcfg.n_params(embeddings=False) + mcfg.d_vocab * mcfg.d_model
    return 6 * matmul_params + 12 * mcfg.n_layers * mcfg.n_heads * mcfg.d_head * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_per_device: float, world_size: int) -> float:
    """Utilisation of each device: ``tokens_per_s`` over all ``world_size`` processes,
    against one device's ``peak_per_device``."""
    return tokens_per_s / world_size * flops_per_token / peak_per_device


def measure_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of square matmuls on the CPU, best of repeated runs."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t))
    return best


def peak_flops(device: torch.device, precision: str) -> float | None:
    """One device's peak to divide by: looked up for known GPUs, measured on the CPU."""
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device), precision)
    if device.type == "cpu":
        return measure_matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
    return None
