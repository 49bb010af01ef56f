"""Training throughput of HookedGPT2 against a hook-free GPT-2, and MFU.

Both models run through the same ``training.train.train_step`` (AdamW, clipping,
autocast) on the same batches, from the same weights; steps alternate between them in
rounds (one step of each, the order flipping every round) so drift in the machine's
speed (other processes, thermal) hits both alike. The result is the median over rounds
of the reference's step time over ours, with its range and the number of rounds, and a
warning when the range is too wide to conclude. MFU divides the model FLOPs (PaLM's 6N +
attention) by the square-matmul peak measured in this run.

The reference (``benchmarks.reference_model.RefGPT2``) is nanoGPT's architecture written
as plainly as it can be (SDPA attention, fused QKV, tied embeddings), not nanoGPT's own
file: it computes the same function, so 1.0x means every hook point costs nothing.

    python benchmarks/bench_train.py                 # mini shape (the studies'), fp32 and bf16
    python benchmarks/bench_train.py --preset tiny --steps 10 --precisions bf16
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hooked_gpt2 import GPT2Config, HookedGPT2  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.distributed import Dist  # noqa: E402
from training.mfu import flops_per_token, measure_matmul_peak  # noqa: E402
from hooked_gpt2.memory import keep_freed_memory  # noqa: E402
from training.precision import make_autocast  # noqa: E402
from training.state import TrainState  # noqa: E402
from training.train import Setup, make_optimizer, train_step  # noqa: E402
from benchmarks.common import machine_load, rounds_ratio  # noqa: E402
from benchmarks.reference_model import RefGPT2  # noqa: E402


class RandomBatches:
    """Fixed random token batches, cycled (the loop only needs next_batch)."""

    def __init__(self, n: int, batch_size: int, seq_len: int, d_vocab: int):
        gen = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(0, d_vocab, (batch_size, seq_len + 1), generator=gen) for _ in range(n)]
        self.i = 0

    def next_batch(self):
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]


def bench(precision: str, args) -> dict:
    mcfg = GPT2Config.preset(args.preset)
    seq_len = mcfg.n_ctx
    cfg = TrainConfig(preset=args.preset, batch_size=args.batch_size, precision=precision, grad_clip=1.0)
    torch.manual_seed(0)
    hooked = HookedGPT2(mcfg).train()
    ref = RefGPT2(mcfg).train()
    ref.load_state_dict(hooked.state_dict())
    x = torch.randint(0, mcfg.d_vocab, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hooked(x), ref(x), atol=1e-5), "the reference must compute the same function"
    autocast, scaler = make_autocast(precision, torch.device("cpu")), torch.amp.GradScaler("cpu", enabled=False)
    runs = {}
    for name, model in (("hooked", hooked), ("reference", ref)):
        opt = make_optimizer(model, cfg, torch.device("cpu"))
        loader = RandomBatches(4, args.batch_size, seq_len, mcfg.d_vocab)
        runs[name] = (TrainState(model, opt, scaler, loader), Setup(cfg, Dist(), 1, autocast, model), [])
    step = lambda name: train_step(runs[name][0], runs[name][1], 1e-3)  # noqa: E731
    for name in runs:  # warm-up
        step(name)
    for i in range(args.steps):
        order = ("hooked", "reference") if i % 2 == 0 else ("reference", "hooked")
        for name in order:
            t = time.perf_counter()
            step(name)
            runs[name][2].append(time.perf_counter() - t)
    tokens = args.batch_size * seq_len
    hooked_t, ref_t = runs["hooked"][2], runs["reference"][2]
    peak = measure_matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32, seconds=2.0)
    fpt = flops_per_token(mcfg, seq_len)
    tps = {n: tokens / statistics.median(t) for n, t in (("hooked", hooked_t), ("reference", ref_t))}
    return {
        "precision": precision, "hooked_tok_s": tps["hooked"], "ref_tok_s": tps["reference"],
        "ratio": tps["hooked"] / tps["reference"],
        "rounds": rounds_ratio(ref_t, hooked_t),
        "peak_gflops": peak / 1e9, "mfu_hooked": tps["hooked"] * fpt / peak, "mfu_ref": tps["reference"] * fpt / peak,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini", help="model shape (the reference needs an MLP, tied embeddings, no dropout)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences of n_ctx tokens per step")
    p.add_argument("--steps", type=int, default=8, help="timed rounds: one step of each model per round")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="autocast settings to measure")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine more threads time the scheduler)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as training.train does on the CPU
    mcfg = GPT2Config.preset(args.preset)
    print(f"bench_train: {args.preset} ({mcfg.n_params() / 1e6:.2f}M params), batch {args.batch_size}x{mcfg.n_ctx}, "
          f"{args.steps} rounds, {torch.get_num_threads()} threads, torch {torch.__version__}; {machine_load()}")
    print("GPU: " + (torch.cuda.get_device_name() if torch.cuda.is_available()
                     else "none available in this run; CPU figures only"))
    print(f"{'precision':>9} {'hooked tok/s':>13} {'ref tok/s':>10} {'peak GFLOP/s':>12} {'MFU hooked':>10} "
          f"{'MFU ref':>8}  hooked speed / reference's, per round")
    for precision in args.precisions:
        r = bench(precision, args)
        print(f"{r['precision']:>9} {r['hooked_tok_s']:>13,.0f} {r['ref_tok_s']:>10,.0f} {r['peak_gflops']:>12,.0f} "
              f"{r['mfu_hooked']:>10.1%} {r['mfu_ref']:>8.1%}  {r['rounds']}")
    print("tok/s from median step times; the ratio is the reference's step time over ours in the same round "
          "(target >= 0.97: idle hooks cost at most 3%)")
    assert math.isfinite(r["ratio"])


if __name__ == "__main__":
    main()
