"""The GPU paths, checked in one command: prints a table, exits 1 if any check failed.

    python benchmarks/gpu_check.py                      # on a machine with one or more CUDA GPUs
    python benchmarks/gpu_check.py --data data/fineweb-edu --batch-size 16
    python benchmarks/gpu_check.py --cpu                # reduced: tiny model, CPU-only checks

Checks, each a row of the table:

- ``train bf16``: a short ``gpt2-small-untied`` run (bf16 autocast): tokens/s and MFU
  (per GPU, from the run's own metrics.jsonl) and the loss falling;
- ``train fp16+scaler``: the same in fp16 with the gradient scaler (its state saved);
- ``compile``: ``--compile`` (inductor) against the eager bf16 run: first-step loss equal
  within bf16 tolerance, tokens/s ratio;
- ``torchrun x2``: 2-process DDP against 1 process with the same global batch (2+ GPUs);
- ``resume 2->1``: a run saved by 2 processes on 2 GPUs resumed by 1 that sees 1 GPU;
- ``generate``: greedy KV-cache generation against transformers' ``generate`` on the same
  weights (gpt2-small shape, fp32): tokens/s of each, tokens equal;
- ``syncs/step``: host syncs per training step that neither logs, evaluates nor saves,
  from two runs of different lengths: *visible* (our code reads a tensor: ``.item()``, ...)
  and, on CUDA, *hidden* (syncs the ops make themselves, from CUDA's sync debug mode).
  Target on CUDA: at most 1 visible and 0 hidden (on the CPU the count is reported only).

``--cpu`` runs a tiny model on the CPU through the same code (bf16 training, generation,
sync count; the rows that need CUDA say so), so that tests/test_gpu_check.py keeps the
script working without a GPU. The data default is the demo corpus (prepared on first use).
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.syncs import HostReads, cuda_syncs  # noqa: E402
from hooked_gpt2 import GPT2Config, HookedGPT2  # noqa: E402
from training.config import DEFAULT_DATA, TrainConfig  # noqa: E402
from training.train import train  # noqa: E402


@dataclass
class Row:
    check: str
    status: str  # ok, FAIL, skip
    detail: str = ""
    values: dict = field(default_factory=dict)


class Failed(Exception):
    """A check whose result is wrong (as opposed to one that crashed)."""


@dataclass
class Setup:
    cpu: bool
    data: str | None
    work: Path
    batch_size: int
    steps: int
    gpus: int

    def config(self, name: str, **overrides) -> TrainConfig:
        """A short run: no samples, checkpoints only at the start and the end."""
        if self.cpu:
            shape = dict(preset="tiny", model=dict(d_model=32, n_layers=1, n_heads=2, n_ctx=32))
        else:
            shape = dict(preset="gpt2-small-untied", model=dict(dropout=0.0))
        base = dict(**shape, data=self.data, out=str(self.work / name), batch_size=self.batch_size,
                    max_steps=self.steps, warmup_steps=2, eval_every=10**6, eval_batches=1, eval_batch_size=4,
                    log_every=max(self.steps // 5, 1), ckpt_every=10**6, ckpt_log_spaced=False, sample_tokens=0,
                    progress=False, tensorboard=False, overwrite=True, precision="bf16",
                    device="cpu" if self.cpu else "cuda")
        return TrainConfig(**{**base, **overrides})

    def args(self, cfg: TrainConfig) -> list[str]:
        """``cfg`` as training.train flags (through a config file)."""
        path = self.work / f"{Path(cfg.out).name}.json"
        data = cfg.to_dict()
        path.write_text(json.dumps(data))
        return ["--config", str(path)]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def speed(run: Path) -> dict:
    """Median tokens/s and MFU over the logged rows after the first (which holds start-up)."""
    rows = [r for r in metrics(run) if r["tokens_per_s"] is not None]
    steady = rows[1:] or rows
    mfu = [r["mfu"] for r in steady if r["mfu"] is not None]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu": statistics.median(mfu) if mfu else None}


def losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in metrics(run) if r["train_loss"] is not None]


def describe_speed(s: dict) -> str:
    mfu = "n/a (unknown GPU)" if s["mfu"] is None else f"{s['mfu']:.1%}"
    return f"{s['tokens_per_s']:,.0f} tok/s, MFU {mfu}"


def check_falling(name: str, values: list[float]) -> None:
    if not all(math.isfinite(x) for x in values):
        raise Failed(f"{name}: non-finite loss in {values}")
    if not values[-1] < values[0]:
        raise Failed(f"{name}: the loss did not fall ({values[0]:.3f} -> {values[-1]:.3f})")


# The checks: each returns a Row or raises (Failed: wrong result; anything else: a crash).
def train_bf16(s: Setup) -> Row:
    run = train(s.config("bf16"))
    check_falling("bf16", losses(run))
    sp = speed(run)
    return Row("train bf16", "ok", describe_speed(sp), sp)


def train_fp16(s: Setup) -> Row:
    if s.cpu:
        return Row("train fp16+scaler", "skip", "needs CUDA")
    run = train(s.config("fp16", precision="fp16"))
    check_falling("fp16", losses(run))
    if not list((run / "checkpoints").glob("step_*/resume/grad_scaler.pt")):
        raise Failed("no grad_scaler.pt saved with the resume state")
    sp = speed(run)
    return Row("train fp16+scaler", "ok", describe_speed(sp), sp)


def compile_check(s: Setup) -> Row:
    if s.cpu:
        return Row("compile", "skip", "inductor takes minutes on a CPU; tests/test_compile.py covers it (aot_eager)")
    eager = s.work / "bf16"
    run = train(s.config("compiled", compile=True))
    first_eager, first_compiled = losses(eager)[0], losses(run)[0]
    if abs(first_eager - first_compiled) > 2e-2 * abs(first_eager):
        raise Failed(f"first-step loss {first_compiled:.4f} compiled against {first_eager:.4f} eager")
    check_falling("compiled", losses(run))
    sp = speed(run)
    ratio = sp["tokens_per_s"] / speed(eager)["tokens_per_s"]
    return Row("compile", "ok", f"{describe_speed(sp)}; {ratio:.2f}x eager; first loss "
               f"{first_compiled:.4f} vs {first_eager:.4f}", {**sp, "ratio_to_eager": ratio})


def torchrun(s: Setup, cfg: TrainConfig, nproc: int) -> None:
    command(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
             "-m", "training.train", *s.args(cfg)])


def command(args: list[str], **env) -> None:
    """``python ARGS`` in the repository, with ``env`` added; Failed unless it exits 0."""
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env})
    if result.returncode != 0:
        raise Failed(f"python {' '.join(args)} exited {result.returncode}: {result.stderr.strip()[-600:]}")


def ddp_check(s: Setup) -> Row:
    if s.gpus < 2:
        return Row("torchrun x2", "skip", f"needs 2 GPUs ({s.gpus} here); tests/test_train_ddp.py runs gloo DDP on the CPU")
    tokens = 2 * s.batch_size * s.config("x").resolved_seq_len()
    # fp32 (TF32 matmuls), 10 steps: the two batch layouts round differently, so not bitwise.
    same = dict(global_batch_tokens=tokens, precision="fp32", max_steps=min(s.steps, 10), log_every=1)
    two = s.config("ddp2", **same)
    torchrun(s, two, 2)
    one = train(s.config("ddp1", **same))  # 2 accumulation steps
    a, b = losses(Path(two.out)), losses(one)
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    if len(a) != len(b) or worst > 5e-3:
        raise Failed(f"2-process losses {a} differ from 1-process {b}")
    sp = speed(Path(two.out))
    return Row("torchrun x2", "ok", f"{describe_speed(sp)} (MFU per GPU); losses = 1 process's within "
               f"{worst:.1e} (relative)", {**sp, "max_relative_loss_diff": worst})


def resume_check(s: Setup) -> Row:
    if s.gpus < 2:
        return Row("resume 2->1", "skip", f"needs 2 GPUs ({s.gpus} here)")
    half = max(s.steps // 2, 1)
    tokens = 2 * s.batch_size * s.config("x").resolved_seq_len()
    cfg = s.config("resume", global_batch_tokens=tokens, max_steps=half)
    torchrun(s, cfg, 2)
    # One process that sees one GPU, as on a smaller machine.
    command(["-m", "training.train", "--out", cfg.out, "--resume", "--max-steps", str(s.steps)], CUDA_VISIBLE_DEVICES="0")
    run = Path(cfg.out)
    steps = [r["step"] for r in metrics(run)]
    if steps[-1] != s.steps or not all(math.isfinite(x) for x in losses(run)):
        raise Failed(f"resumed run ended at step {steps[-1]} with losses {losses(run)}")
    return Row("resume 2->1", "ok", f"saved by 2 processes (2 GPUs) at step {half}, resumed by 1 (1 GPU visible) "
               f"to step {s.steps}")


def generate_check(s: Setup) -> Row:
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device("cpu" if s.cpu else "cuda")
    cfg = GPT2Config.preset("tiny", n_layers=1, d_model=32, n_heads=2, n_ctx=64) if s.cpu else GPT2Config.preset("gpt2-small")
    torch.manual_seed(0)
    model = HookedGPT2(cfg).eval()
    hf_dir = s.work / "hf"
    model.save_hf(hf_dir)
    model = model.to(device)
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).to(device).eval()
    prompt = torch.randint(0, cfg.d_vocab, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    new = min(8 if s.cpu else 128, cfg.n_ctx - prompt.shape[1])
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 both ways: comparable tokens
    try:
        runs = {"ours": lambda: model.generate(prompt, new, temperature=0),
                "transformers": lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                                    do_sample=False, eos_token_id=None, pad_token_id=0)}
        out, times = {}, {name: [] for name in runs}
        with torch.inference_mode():
            for _ in range(2 if s.cpu else 4):
                for name, fn in runs.items():
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    out[name] = fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    rate = {name: new / min(ts[1:]) for name, ts in times.items()}  # the first round warms up
    same = (out["ours"][0, prompt.shape[1]:] == out["transformers"][0, prompt.shape[1]:]).tolist()
    agree = same.index(False) if False in same else len(same)
    if agree == 0:
        raise Failed("the first greedy token differs from transformers'")
    detail = (f"{rate['ours']:,.0f} tok/s against transformers {rate['transformers']:,.0f} "
              f"({rate['ours'] / rate['transformers']:.2f}x); {agree}/{new} greedy tokens equal")
    return Row("generate", "ok", detail, {**{f"{k}_tokens_per_s": v for k, v in rate.items()}, "tokens_equal": agree})


def sync_check(s: Setup) -> Row:
    """Syncs per plain step: the difference between runs of n and n + k steps."""
    short, extra = 3, 4
    counts = {}
    for n in (short, short + extra):
        # log_every larger than the run: only the last step logs; nothing evaluates or saves in between.
        cfg = s.config(f"syncs{n}", max_steps=n, log_every=10**6, peak_flops=1.0)  # no peak measurement
        with HostReads() as reads, cuda_syncs() if not s.cpu else contextlib.nullcontext() as all_syncs:
            train(cfg)
        counts[n] = (reads.total, None if all_syncs is None else len(all_syncs))
    visible = (counts[short + extra][0] - counts[short][0]) / extra
    detail = f"{visible:g} visible"
    values = {"visible": visible}
    if not s.cpu:
        hidden = (counts[short + extra][1] - counts[short][1]) / extra - visible
        detail += f", {hidden:g} hidden"
        values["hidden"] = hidden
    else:
        detail += ", hidden: needs CUDA"
    if s.cpu:  # reads of CPU tensors wait for nothing; the training hot path on CUDA skips the token check
        return Row("syncs/step", "ok", detail + " per step (CPU: host reads, not syncs; the target is for CUDA)", values)
    detail += " per step (target: <= 1 visible, 0 hidden)"
    status = "ok" if visible <= 1 and values["hidden"] <= 0 else "FAIL"
    return Row("syncs/step", status, detail, values)


CHECKS = [train_bf16, train_fp16, compile_check, ddp_check, resume_check, generate_check, sync_check]


def environment(s: Setup) -> str:
    if s.cpu:
        return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}: reduced mode (--cpu)"
    names = [torch.cuda.get_device_name(i) for i in range(s.gpus)]
    return f"{s.gpus} x {names[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def table(rows: list[Row]) -> str:
    width = max(len(r.check) for r in rows)
    return "\n".join(f"{r.check:<{width}}  {r.status:<4}  {r.detail}" for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="reduced mode on the CPU: a tiny model, no CUDA-only checks")
    p.add_argument("--data", default=None, help=f"prepared token directory (default: {DEFAULT_DATA}, prepared on first use)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per GPU per micro-batch (default 8)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per training run (default 40; 4 with --cpu)")
    p.add_argument("--out", default=None, help="keep the runs in this directory (default: a temporary one, removed)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --cpu for the reduced CPU check", file=sys.stderr)
        return 2
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    s = Setup(cpu=args.cpu, data=args.data, work=work, batch_size=args.batch_size,
              steps=args.steps or (4 if args.cpu else 40), gpus=0 if args.cpu else torch.cuda.device_count())
    rows = []
    try:
        for check in CHECKS:
            name = check.__name__
            start = time.perf_counter()
            try:
                rows.append(check(s))
            except Failed as e:
                rows.append(Row(name, "FAIL", str(e)))
            except Exception as e:  # a crash is a failed check; the others still run
                traceback.print_exc()
                rows.append(Row(name, "FAIL", f"{type(e).__name__}: {e}"[:600]))
            print(f"{rows[-1].check}: {rows[-1].status} {rows[-1].detail} ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_check: {environment(s)}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1) + "\n")
    failed = [r.check for r in rows if r.status == "FAIL"]
    print(f"{len(failed)} failed: {', '.join(failed)}" if failed else "all checks passed (or skipped, as marked)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
