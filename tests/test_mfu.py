"""training.mfu: the GPU peak table, looked up by the names torch.cuda.get_device_name
returns, and the MFU formula (per device)."""

import pytest

from training.mfu import flops_per_token, gpu_peak, mfu
from hooked_gpt2 import GPT2Config

# (name exactly as torch.cuda.get_device_name returns it, dense bf16 TFLOP/s, dense fp16 TFLOP/s)
# from the vendors' data sheets cited in training/mfu.py; None: no native bf16 (or no figure).
NAMES = [
    ("NVIDIA A100-SXM4-40GB", 312, 312),
    ("NVIDIA A100-SXM4-80GB", 312, 312),
    ("NVIDIA A100-PCIE-40GB", 312, 312),
    ("NVIDIA A100 80GB PCIe", 312, 312),
    ("NVIDIA H100 80GB HBM3", 989.5, 989.5),  # SXM5
    ("NVIDIA H100 PCIe", 756.5, 756.5),
    ("NVIDIA H100 NVL", 835.5, 835.5),
    ("NVIDIA H200", 989.5, 989.5),
    ("NVIDIA L4", 121, 121),
    ("NVIDIA L40S", 362.05, 362.05),
    ("NVIDIA L40", 181.05, 181.05),
    ("NVIDIA GeForce RTX 3090", 71, 71),
    ("NVIDIA GeForce RTX 4090", 165.2, 165.2),
    ("NVIDIA A10", 125, 125),
    ("NVIDIA RTX A6000", 154.8, 154.8),
    ("Tesla T4", None, 65),
    ("Tesla V100-SXM2-16GB", None, 125),
    ("Tesla V100-SXM2-32GB", None, 125),
    ("Tesla V100-PCIE-16GB", None, 112),
]


@pytest.mark.parametrize("name, bf16, fp16", NAMES)
def test_peak_of_each_gpu_by_its_device_name(name, bf16, fp16):
    assert gpu_peak(name, "bf16") == (None if bf16 is None else pytest.approx(bf16 * 1e12))
    assert gpu_peak(name, "fp16") == pytest.approx(fp16 * 1e12)


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA RTX 6000 Ada Generation",
                                  "NVIDIA GeForce RTX 3080", "AMD Instinct MI300X", "NVIDIA L4000"])
def test_unknown_gpus_have_no_peak_rather_than_a_neighbours(name):
    # A substring match would give an A10G the A10's figure, a 3090 Ti the 3090's, an
    # RTX 6000 Ada the A6000's: MFU is left empty instead.
    assert gpu_peak(name, "bf16") is None


def test_mfu_is_per_device_tokens_against_one_devices_peak():
    mcfg = GPT2Config.preset("gpt2-small-untied")
    fpt = flops_per_token(mcfg, 1024)
    # 8 GPUs together at 400k tok/s are each doing 50k tok/s against their own peak.
    assert mfu(400_000, fpt, 312e12, world_size=8) == pytest.approx(50_000 * fpt / 312e12)
    assert mfu(400_000, fpt, 312e12, world_size=8) == pytest.approx(mfu(50_000, fpt, 312e12, world_size=1))
