"""Process-group plumbing for torchrun, kept apart from the model and the loop.

Launched by ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK set), a run joins a process group
(nccl on CUDA, gloo on the CPU) with a timeout: a collective that a failed rank never
joins raises after ``timeout_s`` instead of hanging, and torchrun stops the rest when
any worker exits with an error. Without torchrun everything here is a no-op.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hooked_gpt2 import ConfigError
from hooked_gpt2.device import resolve_device


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int, world_size: int = 1) -> torch.device:
    """``auto`` is CUDA when there is a GPU; ``cuda`` is the GPU of this process's LOCAL_RANK."""
    if name.startswith("cuda:") and world_size > 1:
        raise ConfigError(
            f"--device {name} names one GPU, but torchrun started {world_size} processes that would all train on it; "
            "use --device cuda (each process takes the GPU of its LOCAL_RANK) and choose the GPUs with "
            "CUDA_VISIBLE_DEVICES, e.g. CUDA_VISIBLE_DEVICES=2,3 torchrun --nproc_per_node 2 ...")
    if str(resolve_device(name)) == "cuda":  # auto on a GPU machine, or cuda
        name = f"cuda:{local_rank}"
    return resolve_device(name)


def setup(device: str, timeout_s: int) -> Dist:
    """Join the torchrun process group if there is one; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank, world_size)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        # Fail collectives on a dead peer rather than wait forever.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return Dist(rank, local_rank, world_size, dev)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def mean_over_ranks(d: Dist, value: float) -> float:
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item() / d.world_size


def step_stats(d: Dist, loss_sum: torch.Tensor, grad_norm: torch.Tensor, stop: bool) -> tuple[float, float, bool]:
    """A training step's (loss averaged over ranks, grad norm, whether any rank asked to stop).

    The step's one host sync: a single all-reduce of the three, read back once. The grad
    norm is the same on every rank (gradients are already all-reduced), so its mean is it.
    A non-finite loss on any rank makes the mean non-finite on every rank.
    """
    flag = torch.full((), float(stop), dtype=torch.float64, device=loss_sum.device)  # a fill, not a copy
    stats = torch.stack([loss_sum.double(), grad_norm.double().to(loss_sum.device), flag])
    if d.enabled:
        dist.all_reduce(stats)
    loss, norm, stops = stats.tolist()
    return loss / d.world_size, norm / d.world_size, stops > 0


def gather_objects(d: Dist, obj) -> list:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(d: Dist, obj):
    """Rank 0's ``obj`` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
