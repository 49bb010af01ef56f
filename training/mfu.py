"""Model FLOPs utilisation: the FLOPs a step needs against what the hardware can do."""

import time

import torch

# Dense peak FLOP/s by GPU name and precision (tf32 for fp32), from the vendors' data sheets.
GPU_PEAKS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12},
}


def flops_per_token(mcfg, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's estimate: 6 per matmul weight (forward and
    backward) plus attention's 12 * n_layers * n_heads * d_head * seq_len. The unembedding
    is counted (it is a matmul even when tied); the embedding lookups are not."""
    matmul_params = mcfg.n_params(embeddings=False) + mcfg.d_vocab * mcfg.d_model
    return 6 * matmul_params + 12 * mcfg.n_layers * mcfg.n_heads * mcfg.d_head * seq_len


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
    """The peak to divide by: looked up for known GPUs, measured on the CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peaks[precision] for key, peaks in GPU_PEAKS.items() if key in name), None)
    if device.type == "cpu":
        return measure_matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
    return None
