"""training.distributed: which device each torchrun process takes (no GPU needed: the
checks run before any CUDA call)."""

import pytest
import torch

from hooked_gpt2 import ConfigError
from training import distributed
from training.train import main


def test_cuda_n_under_torchrun_is_refused_with_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match=r"--device cuda:1 names one GPU.*2 processes.*CUDA_VISIBLE_DEVICES"):
        distributed.pick_device("cuda:1", local_rank=1, world_size=2)


def test_cuda_under_torchrun_is_each_process_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.pick_device("auto", local_rank=2, world_size=4) == torch.device("cuda:2")
    assert distributed.pick_device("cuda", local_rank=3, world_size=4) == torch.device("cuda:3")
    assert distributed.pick_device("cuda:1", local_rank=0, world_size=1) == torch.device("cuda:1")
    assert distributed.pick_device("cpu", local_rank=1, world_size=2) == torch.device("cpu")


def test_the_command_line_reports_it_without_a_traceback(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["--device", "cuda:0", "--max-steps", "1"]) == 2
    assert "error: --device cuda:0 names one GPU" in capsys.readouterr().err


def test_a_gpu_that_is_not_there_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.pick_device("auto", local_rank=0) == torch.device("cpu")
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU here"):
        distributed.pick_device("cuda", local_rank=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="there are 2 CUDA GPUs here"):
        distributed.pick_device("cuda:2", local_rank=0)
    with pytest.raises(ConfigError, match="there are 2 CUDA GPUs here"):  # torchrun with more processes than GPUs
        distributed.pick_device("cuda", local_rank=3, world_size=4)
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        distributed.pick_device("gpu", local_rank=0)
