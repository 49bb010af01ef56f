"""What a run reports: progress bar, metrics.jsonl, samples.jsonl, TensorBoard, loss plot.

Only rank 0 writes; on the other ranks every method is a no-op.
"""

import contextlib
import time
from pathlib import Path

from tqdm import tqdm

from . import rundir
from .mfu import mfu, peak_flops
from .plots import write_loss_curve

METRIC_KEYS = ("step", "tokens_seen", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu")


class Logger:
    def __init__(self, cfg, d, run_dir: Path, max_steps: int, start_step: int, flops_per_token: float):
        self.on = d.is_main
        self.cfg, self.run_dir, self.flops_per_token = cfg, Path(run_dir), flops_per_token
        self.tokens_per_step, self.world_size = cfg.global_batch_tokens, d.world_size
        self.peak = cfg.peak_flops or (peak_flops(d.device, cfg.precision) if self.on else None)  # one device's
        self.bar = tqdm(total=max_steps, initial=start_step, disable=not (self.on and cfg.progress),
                        unit="step", dynamic_ncols=True)
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.paused_s = 0.0  # evaluation and checkpoint time, left out of tokens/s
        self.pending_val = None
        self.tb = None
        if self.on and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass
        if self.on:
            self.message(f"training {cfg.preset} ({cfg.model_config().n_params() / 1e6:.2f}M params) for "
                         f"{max_steps} steps of {self.tokens_per_step:,} tokens on {d.device} "
                         f"({d.world_size} process{'es' if d.world_size > 1 else ''}, {cfg.precision}) into {run_dir}")

    def message(self, text: str) -> None:
        if self.on:
            tqdm.write(text)

    def sample(self, step: int, prompt: str, text: str) -> None:
        if not self.on:
            return
        self.write_row(rundir.SAMPLES, {"step": step, "prompt": prompt, "text": text})
        self.message(f"[step {step}] {prompt + text!r}")

    def step(self, step, tokens_seen, train_loss, val_loss, lr, grad_norm) -> None:
        """Called every step: the bar always, a metrics row every log_every steps and at evaluations."""
        if not self.on:
            return
        self.bar.update(1)
        if val_loss is not None:
            self.pending_val = val_loss
        if step % self.cfg.log_every and val_loss is None and step != self.bar.total:
            return
        now = time.perf_counter()
        elapsed = max(now - self.last_time - self.paused_s, 1e-9)
        tokens_per_s = (step - self.last_step) * self.tokens_per_step / elapsed
        self.last_time, self.last_step, self.paused_s = now, step, 0.0
        util = mfu(tokens_per_s, self.flops_per_token, self.peak, self.world_size) if self.peak else None
        row = dict(zip(METRIC_KEYS, (step, tokens_seen, train_loss, val_loss, lr, grad_norm, tokens_per_s, util)))
        self.write_row(rundir.METRICS, row)
        postfix = {"loss": f"{train_loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}", "lr": f"{lr:.2e}"}
        if self.pending_val is not None:
            postfix["val"] = f"{self.pending_val:.3f}"
        self.bar.set_postfix(postfix, refresh=False)
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("step", "tokens_seen") and value is not None:
                    self.tb.add_scalar(key, value, step)

    @contextlib.contextmanager
    def paused(self):
        """Time inside is not training time (evaluation, sampling, checkpoints)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - start

    def eval_row(self, step: int, val_loss: float) -> None:
        """Step 0's row: the initial model's validation loss."""
        if self.on:
            self.write_row(rundir.METRICS, dict.fromkeys(METRIC_KEYS) | {"step": step, "tokens_seen": 0, "val_loss": val_loss})

    def write_row(self, name: str, row: dict) -> None:
        rundir.append_row(self.run_dir, name, row)

    def close(self, step: int, train_loss: float | None, val_loss: float | None) -> None:
        if not self.on:
            return
        self.bar.close()
        fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
        self.message(f"step {step}: train loss {fmt(train_loss)}, val loss {fmt(val_loss or self.pending_val)}")
        if self.tb is not None:
            self.tb.close()
        write_loss_curve(self.run_dir)

