"""training.state and the step: TrainState round trips, RNG states on any device count and
world size (CUDA faked on the CPU), and the host syncs of one training step."""

import copy
import random
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from data_prep.reader import BatchLoader, TokenDataset
from hooked_gpt2 import GPT2Config, HookedGPT2
from training import rundir, state as state_module
from training import train as train_module
from training.config import TrainConfig
from training.distributed import Dist
from training.precision import make_autocast
from training.state import TrainState, rng_for_rank, rng_state

SMALL = dict(d_model=32, n_layers=1, n_heads=2, n_ctx=32, dropout=0.1)


def make_state(data, seed: int, rank: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = HookedGPT2(GPT2Config.preset("tiny", **SMALL)).train()
    cfg = TrainConfig(preset="tiny", model=dict(SMALL))
    loader = BatchLoader(TokenDataset(data, "train"), 4, 32)
    return TrainState(model, train_module.make_optimizer(model, cfg, torch.device("cpu")),
                      torch.amp.GradScaler("cpu", enabled=False), loader, rank=rank, seed=seed)


def make_setup(model, d: Dist = Dist()) -> train_module.Setup:
    cfg = TrainConfig(preset="tiny", model=dict(SMALL))
    return train_module.Setup(cfg, d, 1, make_autocast("fp32", torch.device("cpu")), model)


def test_state_dict_round_trip_continues_bitwise(shakespeare_data, tmp_path):
    a = make_state(shakespeare_data, seed=0)
    setup = make_setup(a.model)
    for _ in range(3):
        train_module.train_step(a, setup, lr=1e-3)
    saved = copy.deepcopy(a.state_dict())  # like torch's, it shares the live tensors
    resume = {k: saved[k] for k in ("optimizer", "grad_scaler", "loader")} | {"rng": [saved["rng"]]}
    ckpt = rundir.save_checkpoint(tmp_path, a.model, {"step": a.step}, resume)
    expected = [train_module.train_step(a, setup, lr=1e-3)[0] for _ in range(2)]  # dropout draws from the RNG

    b = make_state(shakespeare_data, seed=1)  # other weights, fresh optimizer and loader, other RNG
    b.load_state_dict(saved)
    assert b.step == 3
    assert [train_module.train_step(b, make_setup(b.model), lr=1e-3)[0] for _ in range(2)] == expected
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))

    # Through the checkpoint on disk (safetensors, torch.load weights_only, JSON): the same.
    c = make_state(shakespeare_data, seed=2)
    on_disk = rundir.load_checkpoint(ckpt)
    c.load_state_dict({**on_disk, "step": on_disk["info"]["step"], "rng": rng_for_rank(on_disk["rng"], 0)})
    assert [train_module.train_step(c, make_setup(c.model), lr=1e-3)[0] for _ in range(2)] == expected


def test_parameters_are_restored_by_name(shakespeare_data):
    a = make_state(shakespeare_data, seed=0)
    saved = a.state_dict()
    b = make_state(shakespeare_data, seed=1)
    b.load_state_dict({**saved, "model": dict(reversed(list(saved["model"].items())))})  # order does not matter
    assert torch.equal(b.model.blocks[0].attn.qkv.weight, a.model.blocks[0].attn.qkv.weight)
    del saved["model"]["blocks.0.attn.qkv.weight"]
    with pytest.raises(RuntimeError, match="blocks.0.attn.qkv.weight"):
        b.load_state_dict(saved)


class FakeCuda:
    """``device_count`` GPUs whose generators are distinguishable byte tensors; the
    all-device calls that crashed on fewer GPUs raise."""

    def __init__(self, monkeypatch, device_count: int):
        self.device_count, self.current, self.restored = device_count, 0, []
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: self.device_count)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "get_rng_state", self.get)
        monkeypatch.setattr(cuda, "set_rng_state", self.set)
        monkeypatch.setattr(cuda, "manual_seed_all", lambda seed: None)
        for name in ("get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(cuda, name, lambda *a: pytest.fail("all-device RNG calls index missing GPUs"))

    def get(self, device="cuda"):
        assert self.current < self.device_count
        return torch.full((4,), 100 + self.current, dtype=torch.uint8)

    def set(self, new_state, device="cuda"):
        assert self.current < self.device_count, "restored onto a GPU this machine does not have"
        self.restored.append((self.current, int(new_state[0])))


def saved_by_ranks(cuda: FakeCuda, world_size: int) -> list[dict]:
    """What a run on ``world_size`` GPUs saves: each rank its own device's state."""
    out = []
    for rank in range(world_size):
        cuda.current = rank
        torch.manual_seed(rank)
        out.append(rng_state())
    return out


def restore(states: list[dict], rank: int, seed: int = 1337) -> torch.Tensor:
    """What TrainState.load_state_dict does with a checkpoint's RNG list on ``rank``;
    returns the CPU generator's state."""
    picked = rng_for_rank(states, rank)
    if picked is None:
        state_module.seed_rng(state_module.derived_seed(seed, rank))
    else:
        state_module.set_rng_state(picked)
    return torch.get_rng_state()


def test_rng_saved_on_eight_gpus_resumes_on_one(monkeypatch):
    cuda = FakeCuda(monkeypatch, device_count=8)
    states = saved_by_ranks(cuda, 8)
    assert [int(s["cuda"][0]) for s in states] == list(range(100, 108)), "each rank saves its own device only"
    cuda.device_count, cuda.current = 1, 0
    cpu = restore(states, rank=0)
    assert cuda.restored == [(0, 100)], "rank 0 gets rank 0's own GPU state, on the one GPU there is"
    assert torch.equal(cpu, states[0]["torch"])


def test_rng_saved_on_one_gpu_resumes_on_eight(monkeypatch):
    cuda = FakeCuda(monkeypatch, device_count=1)
    states = saved_by_ranks(cuda, 1)
    cuda.device_count = 8
    cpu = {}
    for rank in range(8):
        cuda.current = rank
        cpu[rank] = restore(states, rank)
    assert torch.equal(cpu[0], states[0]["torch"]) and cuda.restored == [(0, 100)]
    assert len({bytes(s.numpy()) for s in cpu.values()}) == 8, "every new rank has its own generator"
    assert torch.equal(restore(states, 3), cpu[3]), "derived from the seed and rank: the same every time"
    assert not torch.equal(restore(states, 3, seed=7), cpu[3]), "and from the seed"
    restore(states, 3)
    np_draw, py_draw = np.random.random(), random.random()
    restore(states, 3)
    assert (np.random.random(), random.random()) == (np_draw, py_draw), "NumPy and Python generators too"


def test_old_checkpoints_with_every_devices_states_still_resume(monkeypatch):
    cuda = FakeCuda(monkeypatch, device_count=2)
    old = rng_state() | {"cuda": [torch.full((4,), 7, dtype=torch.uint8), torch.full((4,), 8, dtype=torch.uint8)]}
    cuda.current = 1
    state_module.set_rng_state(old)
    assert cuda.restored == [(1, 8)]


def test_one_host_sync_per_step_under_ddp(shakespeare_data, monkeypatch):
    """On a step that logs nothing, the only read from the device is the folded
    loss/grad-norm/stop all-reduce. Counted for the training code's calls, on the CPU path
    standing in for the GPU, two ranks simulated by a doubling all-reduce. (The model's
    token-range check reads too on the CPU; on CUDA in training mode it is skipped.)"""
    state = make_state(shakespeare_data, seed=0)
    d = Dist(rank=0, world_size=2)
    setup = make_setup(state.model, d)
    counts = {"all_reduce": 0, "reads": []}

    def fake_all_reduce(tensor, op=dist.ReduceOp.SUM, **kw):
        counts["all_reduce"] += 1
        tensor.mul_(2)  # the other rank holds the same values

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "/training/" in caller:
                counts["reads"].append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    results = [train_module.train_step(state, setup, lr=1e-3, stop=step == 2) for step in range(3)]
    assert counts["all_reduce"] == 3, "one all-reduce per step: loss, grad norm and stop flag together"
    assert counts["reads"] == ["tolist"] * 3, "one read to the host per step, no .item()"
    assert [stop for *_, stop in results] == [False, False, True]
    assert all(np.isfinite(loss) and norm > 0 for loss, norm, _ in results)
