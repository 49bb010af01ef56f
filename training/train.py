"""Train a HookedGPT2 from scratch: ``python -m training.train --help``.

    python -m training.train                                   # the demo, into runs/demo
    python -m training.train --preset gpt2-small-untied --data DIR --precision bf16 --max-steps 5000
    torchrun --nproc_per_node 8 -m training.train --preset gpt2-small-untied --data DIR ...
    python -m training.train --out runs/demo --resume          # continue after an interrupt

From Python, ``train(TrainConfig(...))`` returns the run directory. Fine-tuning
(``training.finetune``) reuses the pieces: a ``TrainState`` (``training.state``), a ``Setup``
(its ``batch_loss`` reads the loader's batches), ``run_loop`` and in it
``train_step(state, setup, lr)``; ``save`` / ``restore`` checkpoint the state into a run
directory (``training.rundir``).
"""

import contextlib
import math
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from data_prep.reader import BatchLoader, ShardError, TokenDataset, load_manifest, manifest_vocab
from data_prep.repeats import RepeatedSpans, frequent_tokens
from data_prep.sources import DataPrepError
from hooked_gpt2 import CheckpointError, ConfigError, HookedGPT2
from hooked_gpt2.losses import next_token_loss
from hooked_gpt2.memory import keep_freed_memory
from hooked_gpt2.tokenizer import D_VOCAB

from . import distributed, rundir
from .config import (DEFAULT_DATA, FIXED_ON_RESUME, TrainConfig, changed_fields, config_from_args, default_data,
                     default_out)
from .evaluate import evaluate, fixed_val_batches, sample
from .logger import Logger
from .mfu import flops_per_token
from .precision import make_autocast, resolve_precision
from .schedule import checkpoint_steps, get_lr
from .state import TrainState, rng_for_rank


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


def token_batch_loss(forward: torch.nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pretraining's loss on one loader batch of ``[batch, seq_len + 1]`` tokens (inputs and
    the final target)."""
    batch = batch.to(device, non_blocking=True)
    return next_token_loss(forward(batch[:, :-1]), batch)


@dataclass
class Setup:
    """What every step of a run uses and nothing changes: the config, the processes, the
    micro-batches per step, the autocast factory, the module the forward pass goes
    through (the model, or its DDP / compiled wrapper), and the loss of one loader batch
    (``batch_loss(forward, batch, device)``; fine-tuning's batches carry their labels)."""

    cfg: TrainConfig
    d: distributed.Dist
    accum: int
    autocast: Callable
    forward: torch.nn.Module
    batch_loss: Callable = token_batch_loss


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
    max_steps = cfg.max_steps
    ckpt_steps = set(checkpoint_steps(max_steps, cfg.ckpt_every, cfg.ckpt_log_spaced))

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = HookedGPT2(mcfg).to(d.device).train()
    state = TrainState(model, make_optimizer(model, cfg, d.device),
                       torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16"),
                       make_loader(cfg, d), rank=d.rank, seed=cfg.seed)
    val_batches = fixed_val_batches(cfg.data, cfg.eval_batch_size, cfg.seq_len, cfg.eval_batches)
    torch.manual_seed(cfg.seed + d.rank)  # each rank its own dropout masks
    if cfg.resume:
        restore(run_dir, state)
    if d.is_main:
        write_config(cfg, d, mcfg)
        rundir.trim_metrics(run_dir, state.step)
    forward = torch.compile(model) if cfg.compile else model
    if d.enabled:
        forward = DDP(forward, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    setup = Setup(cfg, d, cfg.grad_accum_steps(d.world_size), make_autocast(cfg.precision, d.device), forward)

    log = Logger(cfg, d, run_dir, max_steps, state.step, flops_per_token(mcfg, cfg.seq_len))
    run_loop(run_dir, state, setup, log, max_steps, ckpt_steps, stop_after, "python -m training.train",
             evaluate=lambda step: eval_and_sample(model, val_batches, setup, log, step, step == max_steps))
    return run_dir


def run_loop(run_dir: Path, state: TrainState, setup: Setup, log: Logger, max_steps: int, ckpt_steps: set[int],
             stop_after: int | None, command: str, evaluate: Callable[[int], float]) -> None:
    """Train ``state`` to ``max_steps`` (pretraining's loop, and fine-tuning's): the step-0
    evaluation and checkpoint of a new run, then ``train_step`` each step, the validation
    loss ``evaluate(step)`` every ``eval_every`` steps and at the end, a checkpoint at
    ``ckpt_steps``, and a resumable stop on SIGINT/SIGTERM or at ``stop_after``.
    ``command`` is how the user resumes the run."""
    cfg = setup.cfg
    if state.step == 0:
        val_loss = evaluate(0)
        log.eval_row(0, val_loss)
        save(run_dir, state, setup, train_loss=None, val_loss=val_loss)
    loss, val_loss = None, None
    with StopSignal() as stop:
        while state.step < max_steps:
            lr = get_lr(state.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                        max_steps=max_steps, schedule=cfg.schedule)
            loss, grad_norm, interrupted = train_step(state, setup, lr, stop.requested or state.step + 1 == stop_after)
            if not math.isfinite(loss):  # train_step left the weights and state.step as they were
                raise TrainingError(f"the training loss is {loss} at step {state.step + 1}: stopping. The last good "
                                    f"checkpoint is {rundir.latest_resumable(run_dir)}; lower --lr or keep --grad-clip on")
            step = state.step
            val_loss = None
            if step % cfg.eval_every == 0 or step == max_steps:
                with log.paused():
                    val_loss = evaluate(step)
            log.step(step, step * cfg.global_batch_tokens, loss, val_loss, lr, grad_norm)
            if step in ckpt_steps or interrupted:
                with log.paused():
                    save(run_dir, state, setup, loss, val_loss)
            if interrupted:
                log.message(f"stopped at step {step}: resumable checkpoint saved; continue with "
                            f"{command} --out {run_dir} --resume")
                break
    log.close(state.step, loss, val_loss)


def train_step(state: TrainState, setup: Setup, lr: float, stop: bool = False) -> tuple[float, float, bool]:
    """One optimizer step over ``setup.accum`` micro-batches.

    Returns (mean loss, gradient norm before clipping, whether any rank asked to stop),
    read from the device in the step's one host sync (``distributed.step_stats``). On a
    non-finite loss the weights are left as they were and ``state.step`` is not advanced.
    """
    d, optimizer, scaler = setup.d, state.optimizer, state.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=d.device)
    for micro in range(setup.accum):
        batch = state.loader.next_batch()
        # DDP all-reduces gradients only on the last micro-step.
        sync = micro == setup.accum - 1 or not d.enabled
        with contextlib.nullcontext() if sync else setup.forward.no_sync():
            with setup.autocast():
                loss = setup.batch_loss(setup.forward, batch, d.device) / setup.accum
            scaler.scale(loss).backward()
        total += loss.detach()
    scaler.unscale_(optimizer)
    params = [p for p in state.model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    loss, norm, stop = distributed.step_stats(d, total, grad_norm, stop)
    if not math.isfinite(loss):
        return loss, norm, stop  # the run stops here: no update from a non-finite loss
    if setup.cfg.grad_clip is not None:
        torch.nn.utils.clip_grads_with_norm_(params, setup.cfg.grad_clip, grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return loss, norm, stop


def make_loader(cfg: TrainConfig, d: distributed.Dist):
    """The training batches: the split in order, with ``repeat_fraction`` of rows made repeated spans."""
    dataset = TokenDataset(cfg.data, "train")
    loader = BatchLoader(dataset, cfg.batch_size, cfg.seq_len, rank=d.rank, world_size=d.world_size,
                         pin_memory=d.device.type == "cuda", order_seed=cfg.data_order_seed)
    if cfg.repeat_fraction == 0:
        return loader
    vocab = frequent_tokens(dataset, cfg.repeat_vocab)
    if len(vocab) < cfg.repeat_span:
        raise ConfigError(f"the training split has only {len(vocab)} distinct tokens, fewer than --repeat-span "
                          f"{cfg.repeat_span}; lower --repeat-span")
    return RepeatedSpans(loader, cfg.repeat_fraction, vocab, cfg.repeat_span, seed=cfg.seed)


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
                             fused=device.type in ("cuda", "cpu"))


def eval_and_sample(model, val_batches, setup: Setup, log, step, final=False) -> float:
    """Validation loss on the fixed batches (split over ranks), and rank 0's samples."""
    cfg, d = setup.cfg, setup.d
    mine = val_batches[d.rank :: d.world_size]
    total = evaluate(model, mine, setup.autocast) * len(mine) if mine else 0.0
    val_loss = distributed.mean_over_ranks(d, total) * d.world_size / len(val_batches)
    if d.is_main and cfg.sample_tokens and (step % cfg.sample_every == 0 or final):
        for i, prompt in enumerate(cfg.sample_prompts):
            log.sample(step, prompt, sample(model, prompt, cfg.sample_tokens, seed=cfg.seed + i))
    return val_loss


def save(run_dir, state: TrainState, setup: Setup, train_loss, val_loss) -> None:
    """Checkpoint ``state`` (rank 0 writes; every rank contributes its RNG state)."""
    saved = state.state_dict()
    rngs = distributed.gather_objects(setup.d, saved["rng"])
    if setup.d.is_main:
        info = {"step": state.step, "tokens_seen": state.step * setup.cfg.global_batch_tokens,
                "train_loss": train_loss, "val_loss": val_loss}
        resume = {"optimizer": saved["optimizer"], "grad_scaler": saved["grad_scaler"], "rng": rngs,
                  "loader": saved["loader"]}
        rundir.save_checkpoint(run_dir, state.model, info, resume)
        rundir.drop_old_resume_state(run_dir, setup.cfg.keep_resume)
    distributed.barrier(setup.d)


def restore(run_dir, state: TrainState) -> None:
    """Load the latest resumable checkpoint into ``state``."""
    ckpt = rundir.latest_resumable(run_dir)
    if ckpt is None:
        raise TrainingError(f"{run_dir} has no resumable checkpoint; start a new run without --resume")
    saved = rundir.load_checkpoint(ckpt)
    state.load_state_dict({**saved, "step": saved["info"]["step"], "rng": rng_for_rank(saved["rng"], state.rank)})


# Setting up: resolve defaults, check the run directory, record the config.
def resolve(cfg: TrainConfig, d: distributed.Dist) -> TrainConfig:
    """``cfg`` with every default made explicit (absolute paths, batch, steps, precision)."""
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, d.device))
    if cfg.precision == "fp16" and d.device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA GPU (autocast with a grad scaler); on the CPU use bf16 or fp32")
    data = cfg.data
    if data is None:
        if d.is_main:
            prepare_default_data(cfg.preset, progress=cfg.progress)
        distributed.barrier(d)
        data = default_data(cfg.preset)[0]
    if not (Path(data) / "manifest.json").is_file():
        raise ConfigError(f"no prepared data at {data} (no manifest.json); prepare it with "
                          f"python -m data_prep.prepare --source ... --out {data} (then python -m data_prep.compact for a "
                          "compact vocabulary), or omit --data for the demo corpus")
    model = {**cfg.model, **vocab_fields(Path(data), cfg.model)}
    seq_len = cfg.resolved_seq_len()
    global_tokens = cfg.global_batch_tokens or cfg.batch_size * seq_len * d.world_size
    out = cfg.out or default_out(cfg.preset)
    out = distributed.broadcast_object(d, out)  # a timestamped default must agree across ranks
    resolved = TrainConfig.from_dict({**cfg.to_dict(), "model": model, "data": str(Path(data).resolve()),
                                      "out": str(Path(out).resolve()),
                                      "seq_len": seq_len, "global_batch_tokens": global_tokens,
                                      "max_steps": cfg.resolved_max_steps(d.world_size), "max_tokens": None})
    resolved.grad_accum_steps(d.world_size)  # raises if the batch does not divide
    return resolved


def prepare_default_data(preset: str, progress: bool = True) -> str:
    """The data a run of ``preset`` trains on without ``--data`` (``default_data``), prepared
    from the embedded corpus if it is not there yet. Call it from one process at a time."""
    from data_prep.prepare import ensure_default_data

    data, vocab_size = default_data(preset)
    ensure_default_data(DEFAULT_DATA, vocab_size=vocab_size, compact_out=data, progress=progress)
    return data


def vocab_fields(data: Path, model: dict) -> dict:
    """The model fields the data fixes: over a compact vocabulary (``data_prep.compact``)
    its size and ids, which config.json then records; none over GPT-2's ids."""
    vocab = manifest_vocab(load_manifest(data))
    if vocab is None:
        if model.get("vocab") is not None:
            raise ConfigError(f"the model sets a compact vocabulary but {data} holds GPT-2's token ids; train it on "
                              "the data it was made for (python -m data_prep.compact), or drop model.vocab")
        return {}
    # GPT-2's vocabulary size is every preset's default (config.json writes it out): not a choice.
    given = {k: model[k] for k in ("d_vocab", "vocab") if model.get(k) not in (None, D_VOCAB)}
    fixed = {"d_vocab": len(vocab), "vocab": vocab}
    if any(given[k] != fixed[k] for k in given):
        raise ConfigError(f"{data} has a compact vocabulary of {len(vocab)} tokens (data_prep.compact), which "
                          "fixes the model's d_vocab and vocab; drop them from the model overrides")
    return fixed


def prepare_run_dir(cfg, d: distributed.Dist, fixed_changed: Callable[[dict], list[str]] | None = None) -> None:
    """Check ``cfg.out`` against ``cfg.resume`` / ``cfg.overwrite`` and make it ready.
    ``fixed_changed(saved_config)`` names the fields a resume may not change (default:
    TrainConfig's, by their roles)."""
    run_dir = Path(cfg.out)
    exists = run_dir.is_dir() and any(p.is_file() for p in run_dir.rglob("*"))  # empty folders do not count
    if cfg.resume:
        if not rundir.has_config(run_dir):
            raise TrainingError(f"nothing to resume: {run_dir} holds no run (no config.json); "
                                "give the run's directory with --out")
        fixed_changed = fixed_changed or (lambda saved: changed_fields(saved, cfg, FIXED_ON_RESUME))
        changed = fixed_changed(rundir.read_config(run_dir))
        if changed:
            raise TrainingError(f"--resume with settings that differ from the run's config.json: {changed}; these "
                                "describe the experiment (only hardware, length and bookkeeping settings may change); "
                                "resume with the run's own settings, or start a new run with a new --out")
    elif exists and not cfg.overwrite:
        raise TrainingError(f"run directory {run_dir} already exists and is not empty; continue it with --resume, "
                            "choose a new --out, or pass --overwrite to delete it")
    distributed.barrier(d)  # every rank has checked before rank 0 changes anything
    if d.is_main:
        if exists and cfg.overwrite and not cfg.resume:
            shutil.rmtree(run_dir)
        rundir.make_checkpoints_dir(run_dir)
    distributed.barrier(d)


def write_config(cfg: TrainConfig, d: distributed.Dist, mcfg) -> None:
    derived = {
        "world_size": d.world_size, "grad_accum_steps": cfg.grad_accum_steps(d.world_size), "device": str(d.device),
        "n_params": mcfg.n_params(), "n_params_non_embedding": mcfg.n_params(embeddings=False),
        "checkpoint_steps": checkpoint_steps(cfg.max_steps, cfg.ckpt_every, cfg.ckpt_log_spaced),
        "torch": torch.__version__,
    }
    rundir.write_config(cfg.out, cfg.to_dict(), derived)


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


def run_command(run: Callable[[], Path], user_errors: tuple[type[Exception], ...]) -> int:
    """The end of a training command: the run directory printed and exit code 0, or a
    user error as one ``error: ...`` line and exit code 2."""
    try:
        run_dir = run()
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run directory: {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: train(config_from_args(argv)),
                       (ConfigError, TrainingError, ShardError, CheckpointError, DataPrepError))


if __name__ == "__main__":
    sys.exit(main())
