"""Train a HookedGPT2 from scratch: ``python -m training.train --help``.

    python -m training.train                                   # the demo, into runs/demo
    python -m training.train --preset gpt2-small-untied --data DIR --precision bf16 --max-steps 5000
    torchrun --nproc_per_node 8 -m training.train --preset gpt2-small-untied --data DIR ...
    python -m training.train --out runs/demo --resume          # continue after an interrupt

From Python, ``train(TrainConfig(...))`` returns the run directory.
"""

import contextlib
import json
import math
import shutil
import signal
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from data_prep.reader import BatchLoader, ShardError, TokenDataset
from data_prep.sources import DataPrepError
from hooked_gpt2.memory import keep_freed_memory
from hooked_gpt2 import CheckpointError, ConfigError, HookedGPT2
from hooked_gpt2.checkpoint import atomic_write_text

from . import checkpointing, distributed
from .config import DEFAULT_DATA, TrainConfig, config_from_args, default_out
from .evaluate import evaluate, fixed_val_batches, next_token_loss, sample
from .logger import Logger
from .mfu import flops_per_token
from .schedule import checkpoint_steps, get_lr

# A resumed run may change these without changing what it computes.
RESUME_MAY_CHANGE = {
    "resume", "overwrite", "max_steps", "max_tokens", "progress", "tensorboard", "log_every", "compile",
    "device", "ddp_timeout_s", "keep_resume", "peak_flops", "sample_tokens", "sample_prompts",
    "eval_every", "sample_every", "ckpt_every", "ckpt_log_spaced",
}


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


def train(cfg: TrainConfig, *, stop_after: int | None = None) -> Path:
    """Run training as ``cfg`` describes and return the run directory.

    ``stop_after`` stops after that step as an interrupt would (resumable checkpoint),
    without changing the run's schedule: for tests and for time-sliced studies.

    >>> run = train(TrainConfig(preset="tiny", data="data/shakespeare", max_steps=20))  # doctest: +SKIP
    """
    d = distributed.setup(cfg.device, cfg.ddp_timeout_s)
    if d.device.type == "cpu":
        keep_freed_memory()
    else:  # TF32 matmuls for fp32 work on Ampere and later (the CPU keeps exact fp32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        return _train(cfg, d, stop_after)
    finally:
        distributed.teardown(d)


def _train(cfg: TrainConfig, d: distributed.Dist, stop_after: int | None) -> Path:
    cfg = resolve(cfg, d)
    run_dir = Path(cfg.out)
    prepare_run_dir(cfg, d)
    mcfg = cfg.model_config()
    accum, max_steps = cfg.grad_accum_steps(d.world_size), cfg.max_steps
    ckpt_steps = set(checkpoint_steps(max_steps, cfg.ckpt_every, cfg.ckpt_log_spaced))
    autocast = make_autocast(cfg.precision, d.device)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = HookedGPT2(mcfg).to(d.device).train()
    optimizer = make_optimizer(model, cfg, d.device)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16")
    loader = BatchLoader(TokenDataset(cfg.data, "train"), cfg.batch_size, cfg.seq_len,
                         rank=d.rank, world_size=d.world_size)
    val_batches = fixed_val_batches(cfg.data, cfg.eval_batch_size, cfg.seq_len, cfg.eval_batches)
    torch.manual_seed(cfg.seed + d.rank)  # each rank its own dropout masks
    start_step = restore(run_dir, model, optimizer, scaler, loader, d) if cfg.resume else 0
    if d.is_main:
        write_config(cfg, d, accum, mcfg)
        trim_metrics(run_dir, start_step)
    train_model = torch.compile(model) if cfg.compile else model
    if d.enabled:
        train_model = DDP(train_model, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    log = Logger(cfg, d, run_dir, max_steps, start_step, flops_per_token(mcfg, cfg.seq_len))
    if start_step == 0:
        val_loss = eval_and_sample(model, val_batches, cfg, d, log, autocast, step=0)
        log.eval_row(0, val_loss)
        save(run_dir, model, optimizer, scaler, loader, d, cfg, step=0, train_loss=None, val_loss=val_loss)
    step, loss, val_loss = start_step, None, None
    with StopSignal() as stop:
        while step < max_steps:
            lr = get_lr(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                        max_steps=max_steps, schedule=cfg.schedule)
            loss, grad_norm = train_step(train_model, model, optimizer, scaler, loader, accum, lr, cfg, d, autocast)
            step += 1
            if not math.isfinite(loss):
                raise TrainingError(f"the training loss is {loss} at step {step}: stopping. The last good checkpoint "
                                    f"is {checkpointing.latest_resumable(run_dir)}; lower --lr or keep --grad-clip on")
            val_loss = None
            if step % cfg.eval_every == 0 or step == max_steps:
                with log.paused():
                    val_loss = eval_and_sample(model, val_batches, cfg, d, log, autocast, step, step == max_steps)
            log.step(step, step * cfg.global_batch_tokens, loss, val_loss, lr, grad_norm)
            interrupted = distributed.any_rank(d, stop.requested or step == stop_after)
            if step in ckpt_steps or interrupted:
                with log.paused():
                    save(run_dir, model, optimizer, scaler, loader, d, cfg, step, loss, val_loss)
            if interrupted:
                log.message(f"stopped at step {step}: resumable checkpoint saved; continue with "
                            f"python -m training.train --out {run_dir} --resume")
                break
    log.close(step, loss, val_loss)
    return run_dir


def train_step(train_model, model, optimizer, scaler, loader, accum, lr, cfg, d, autocast):
    """One optimizer step over ``accum`` micro-batches; returns (mean loss, grad norm)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=d.device)
    for micro in range(accum):
        batch = loader.next_batch().to(d.device, non_blocking=True)
        # DDP all-reduces gradients only on the last micro-step.
        sync = micro == accum - 1 or not d.enabled
        with contextlib.nullcontext() if sync else train_model.no_sync():
            with autocast():
                loss = next_token_loss(train_model, batch) / accum
            scaler.scale(loss).backward()
        total += loss.detach()
    loss = distributed.mean_over_ranks(d, total.item())
    if not math.isfinite(loss):
        return loss, float("nan")  # before the update: the weights stay those of the last step
    return loss, apply_update(model, optimizer, scaler, cfg.grad_clip)


def apply_update(model, optimizer, scaler, grad_clip: float | None) -> float:
    """Unscale, clip and apply the accumulated gradients, then clear them; returns the
    gradient norm before clipping."""
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if grad_clip is not None:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item()


def make_optimizer(model: HookedGPT2, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings, none on biases and layer-norm gains."""
    params = dict(model.named_parameters())  # tied weights appear once
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    ids = [id(p) for p in decay + no_decay]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()}), \
        "every parameter must be in exactly one optimizer group"
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device.type == "cuda")


def make_autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def eval_and_sample(model, val_batches, cfg, d, log, autocast, step, final=False) -> float:
    """Validation loss on the fixed batches (split over ranks), and rank 0's samples."""
    mine = val_batches[d.rank :: d.world_size]
    total = evaluate(model, mine, autocast) * len(mine) if mine else 0.0
    val_loss = distributed.mean_over_ranks(d, total) * d.world_size / len(val_batches)
    if d.is_main and cfg.sample_tokens and (step % cfg.sample_every == 0 or final):
        for i, prompt in enumerate(cfg.sample_prompts):
            log.sample(step, prompt, sample(model, prompt, cfg.sample_tokens, seed=cfg.seed + i))
    return val_loss


def save(run_dir, model, optimizer, scaler, loader, d, cfg, step, train_loss, val_loss) -> None:
    """Checkpoint ``step`` (rank 0 writes; every rank contributes its RNG state)."""
    rngs = distributed.gather_objects(d, checkpointing.rng_state())
    if d.is_main:
        state = {"step": step, "tokens_seen": step * cfg.global_batch_tokens,
                 "train_loss": train_loss, "val_loss": val_loss}
        resume = {"optimizer": optimizer.state_dict(), "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
                  "rng": rngs, "loader": loader.state_dict()}
        checkpointing.save_checkpoint(run_dir, model, state, resume)
        checkpointing.drop_old_resume_state(run_dir, cfg.keep_resume)
    distributed.barrier(d)


def restore(run_dir, model, optimizer, scaler, loader, d) -> int:
    """Load the latest resumable checkpoint into the run's objects; returns its step."""
    ckpt = checkpointing.latest_resumable(run_dir)
    if ckpt is None:
        raise TrainingError(f"{run_dir} has no resumable checkpoint; start a new run without --resume")
    saved = checkpointing.load_resume(ckpt)
    with torch.no_grad():
        for p, q in zip(model.parameters(), saved["model"].parameters(), strict=True):
            p.copy_(q)
    optimizer.load_state_dict(saved["optimizer"])
    if saved["grad_scaler"] is not None:
        scaler.load_state_dict(saved["grad_scaler"])
    loader.load_state_dict(saved["loader"])
    rngs = saved["rng"]
    checkpointing.set_rng_state(rngs[d.rank] if d.rank < len(rngs) else rngs[0])
    return saved["state"]["step"]


# Setting up: resolve defaults, check the run directory, record the config.
def resolve(cfg: TrainConfig, d: distributed.Dist) -> TrainConfig:
    """``cfg`` with every default made explicit (absolute paths, batch, steps)."""
    if cfg.precision == "fp16" and d.device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA GPU (autocast with a grad scaler); on the CPU use bf16 or fp32")
    data = cfg.data
    if data is None:
        if d.is_main:
            from data_prep.prepare import ensure_default_data

            ensure_default_data(DEFAULT_DATA, progress=cfg.progress)
        distributed.barrier(d)
        data = DEFAULT_DATA
    if not (Path(data) / "manifest.json").is_file():
        raise ConfigError(f"no prepared data at {data} (no manifest.json); prepare it with "
                          f"python -m data_prep.prepare --source ... --out {data}, or omit --data for the demo corpus")
    seq_len = cfg.resolved_seq_len()
    global_tokens = cfg.global_batch_tokens or cfg.batch_size * seq_len * d.world_size
    out = cfg.out or default_out(cfg.preset)
    out = distributed.broadcast_object(d, out)  # a timestamped default must agree across ranks
    resolved = TrainConfig.from_dict({**cfg.to_dict(), "data": str(Path(data).resolve()), "out": str(Path(out).resolve()),
                                      "seq_len": seq_len, "global_batch_tokens": global_tokens,
                                      "max_steps": cfg.resolved_max_steps(d.world_size), "max_tokens": None})
    resolved.grad_accum_steps(d.world_size)  # raises if the batch does not divide
    return resolved


def prepare_run_dir(cfg: TrainConfig, d: distributed.Dist) -> None:
    run_dir = Path(cfg.out)
    exists = run_dir.is_dir() and any(p.is_file() for p in run_dir.rglob("*"))  # empty folders do not count
    if cfg.resume:
        if not (run_dir / "config.json").is_file():
            raise TrainingError(f"nothing to resume: {run_dir} holds no run (no config.json); "
                                "give the run's directory with --out")
        saved = json.loads((run_dir / "config.json").read_text())
        saved.pop("derived", None)
        mine = cfg.to_dict()
        changed = sorted(k for k in mine if k not in RESUME_MAY_CHANGE and saved.get(k) != mine[k])
        if changed:
            raise TrainingError(f"--resume with settings that differ from the run's config.json: {changed}; "
                                "resume with the run's own settings, or start a new run with a new --out")
    elif exists and not cfg.overwrite:
        raise TrainingError(f"run directory {run_dir} already exists and is not empty; continue it with --resume, "
                            "choose a new --out, or pass --overwrite to delete it")
    distributed.barrier(d)  # every rank has checked before rank 0 changes anything
    if d.is_main:
        if exists and cfg.overwrite and not cfg.resume:
            shutil.rmtree(run_dir)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        checkpointing.remove_temporaries(run_dir)
    distributed.barrier(d)


def write_config(cfg: TrainConfig, d: distributed.Dist, accum: int, mcfg) -> None:
    derived = {
        "world_size": d.world_size, "grad_accum_steps": accum, "device": str(d.device),
        "n_params": mcfg.n_params(), "n_params_non_embedding": mcfg.n_params(embeddings=False),
        "checkpoint_steps": checkpoint_steps(cfg.max_steps, cfg.ckpt_every, cfg.ckpt_log_spaced),
        "torch": torch.__version__,
    }
    text = json.dumps({**cfg.to_dict(), "derived": derived}, indent=2) + "\n"
    atomic_write_text(Path(cfg.out) / "config.json", text)


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics rows past the resumed step (written before a crash, about to be redone)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / name
        if path.is_file():
            rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
            atomic_write_text(path, "".join(r + "\n" for r in rows))


class StopSignal:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop at the end of the current step."""

    def __enter__(self):
        self.requested = False
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a resumable checkpoint after this step", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        run_dir = train(cfg)
    except (ConfigError, TrainingError, ShardError, CheckpointError, DataPrepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
