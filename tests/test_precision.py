"""training.precision: what ``--precision auto`` chooses on each kind of device (CUDA
capability queries patched: no GPU needed), and that a run records the choice."""

import json

import pytest
import torch

from training.precision import make_autocast, resolve_precision

CAPABILITIES = [  # (GPU, compute capability, auto's choice)
    ("V100", (7, 0), "fp16"),
    ("T4", (7, 5), "fp16"),
    ("A100", (8, 0), "bf16"),
    ("RTX 3090 / A10 / A6000", (8, 6), "bf16"),
    ("L4 / L40S / RTX 4090", (8, 9), "bf16"),
    ("H100", (9, 0), "bf16"),
]


@pytest.mark.parametrize("gpu, capability, expected", CAPABILITIES)
def test_auto_is_bf16_where_the_gpu_has_it_natively_else_fp16(monkeypatch, gpu, capability, expected):
    seen = []

    def capability_of(device=None):
        seen.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    assert resolve_precision("auto", torch.device("cuda:1")) == expected, gpu
    assert seen == [torch.device("cuda:1")], "asks about the run's own GPU"


def test_auto_is_bf16_on_the_cpu_and_explicit_choices_stay():
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("auto", torch.device("meta")) == "fp32"
    for precision in ("fp32", "bf16", "fp16"):
        assert resolve_precision(precision, torch.device("cpu")) == precision


def test_autocast_follows_the_device_and_precision():
    with make_autocast("bf16", torch.device("cpu"))():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with make_autocast("fp32", torch.device("cpu"))():
        assert not torch.is_autocast_enabled("cpu")


def test_a_run_records_the_precision_auto_chose(shakespeare_data, tmp_path):
    from tests.test_train import small_cfg
    from training.train import train

    run = train(small_cfg(shakespeare_data, tmp_path / "run", precision="auto", max_steps=1, eval_batches=1))
    config = json.loads((run / "config.json").read_text())
    assert config["precision"] == "bf16"
