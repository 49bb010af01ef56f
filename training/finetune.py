"""Supervised instruction fine-tuning: ``python -m training.finetune --help``.

    python -m training.finetune --init runs/demo/checkpoints/step_0003000 --data alpaca.json --out runs/demo-sft
    python -m training.finetune --init path/to/gpt2 --data alpaca_data.json --out runs/gpt2-sft --lr 5e-5
    torchrun --nproc_per_node 8 -m training.finetune --init ... --data ... --out ...
    python -m training.finetune --out runs/demo-sft --resume      # continue after an interrupt

``--init`` is any model we can load: one of our checkpoints, a ``save_hf`` export, or
OpenAI's GPT-2 in a Hugging Face directory. The data are Alpaca-format records (see
``training/instructions.py``); a seeded ``--val-fraction`` of them is held out. Each
step sees ``--batch-size`` examples per process, right-padded and cut to the model's
context; by default only the response tokens (and the closing <|endoftext|>) carry
loss, ``--whole-sequence`` puts it on the prompt too.

The run directory is laid out as pretraining's (config.json, metrics.jsonl with the
held-out loss as ``val_loss``, ``checkpoints/step_*`` that every analysis opens, resume
state, loss curve), and the same AMP, DDP and checkpoint machinery runs it. At the end
the model's greedy responses to the held-out prompts go to ``responses.jsonl``, for
``python -m analyses.judge``.
"""

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from analyses.cli import load_model
from analyses.common import AnalysisError
from hooked_gpt2 import CheckpointError, ConfigError, EOT_TOKEN
from hooked_gpt2.atomic import atomic_write
from hooked_gpt2.losses import IGNORE, next_token_loss
from hooked_gpt2.memory import keep_freed_memory

from . import distributed, rundir
from .config import PRECISIONS, SCHEDULES, _arg_type, _help
from .instructions import InstructionDataError, collate, encode, fill, read_instructions, read_template
from .logger import Logger
from .mfu import flops_per_token
from .precision import make_autocast, resolve_precision
from .schedule import checkpoint_steps
from .state import TrainState
from .train import Setup, TrainingError, make_optimizer, prepare_run_dir, restore, run_command, run_loop


@dataclass
class FinetuneConfig:
    """A fine-tuning run; ``RUN/config.json`` holds ``to_dict()`` plus derived numbers."""

    init: str | None = _help("model to start from: our checkpoint, a save_hf export or a Hugging Face GPT-2 directory",
                             default=None)
    data: str | None = _help("Alpaca-format .json or .jsonl (instruction, input, output)", default=None)
    out: str | None = _help("run directory", default=None)
    resume: bool = _help("continue the run in --out from its latest resumable checkpoint", default=False)
    overwrite: bool = _help("delete an existing run directory at --out and start afresh", default=False)
    template: str | None = _help("JSON file with prompt_input and prompt_no_input templates; default Alpaca's",
                                 default=None)
    response_loss_only: bool = _help("loss on the response tokens only (--no-response-loss-only: whole sequence)",
                                     default=True)
    max_len: int | None = _help("tokens per example, longer ones cut; default the model's n_ctx", default=None)
    val_fraction: float = _help("fraction of the records held out for validation loss and responses", default=0.1)
    seed: int = _help("seed for the held-out split, the data order and dropout", default=123)
    batch_size: int = _help("examples per step per process", default=8)
    epochs: int = _help("passes over the training records (unless --max-steps)", default=2)
    max_steps: int | None = _help("optimizer steps; default epochs x steps per epoch", default=None)
    lr: float = _help("peak learning rate", default=5e-5)
    min_lr: float = _help("learning rate at the end of the decay", default=5e-6)
    warmup_steps: int = _help("linear warm-up steps", default=0)
    schedule: str = _help("after warm-up: cosine or linear decay to --min-lr, or constant", default="cosine")
    weight_decay: float = _help("AdamW weight decay on matrices", default=0.1)
    beta1: float = _help("AdamW beta1", default=0.9)
    beta2: float = _help("AdamW beta2", default=0.95)
    eps: float = _help("AdamW epsilon", default=1e-8)
    grad_clip: float | None = _help("clip the global gradient norm to this (off = no clipping)", default=1.0)
    precision: str = _help("auto (bf16 where native, else fp16 on CUDA), fp32, bf16 (autocast) or fp16 (autocast + "
                           "grad scaler, CUDA)", default="auto")
    device: str = _help("auto (CUDA if available), cpu, cuda or cuda:N", default="auto")
    ddp_timeout_s: int = _help("seconds a process waits on the others before the run fails", default=600)
    eval_every: int = _help("steps between held-out losses (also at step 0 and the end)", default=50)
    log_every: int = _help("steps between metrics.jsonl rows", default=5)
    ckpt_every: int = _help("steps between checkpoints (also step 0 and the last)", default=100)
    keep_resume: int = _help("keep resume state in this many latest checkpoints", default=1)
    max_new_tokens: int = _help("longest generated response for responses.jsonl", default=256)
    progress: bool = _help("show a progress bar", default=True)
    tensorboard: bool = _help("also log to RUN/tensorboard when tensorboard is installed", default=False)
    peak_flops: float | None = _help("peak FLOP/s for MFU; default measured (CPU) or looked up (GPU)", default=None)

    def __post_init__(self):
        if self.init is None or self.data is None or self.out is None:
            raise ConfigError("give --init MODEL, --data FILE and --out DIR (or --out DIR --resume)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("batch_size", "epochs", "eval_every", "log_every", "ckpt_every", "keep_resume", "max_new_tokens"):
            if not getattr(self, name) >= 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"need lr > 0 and 0 <= min_lr <= lr; got lr={self.lr}, min_lr={self.min_lr}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# What a resumed fine-tune must keep (training.config's ROLES, for FinetuneConfig): the
# starting point, the data and its split, the loss and the optimisation. The rest (length,
# hardware, bookkeeping: epochs, max_steps, device, out, eval_every, ...) may change.
FIXED_ON_RESUME = ("init", "data", "template", "response_loss_only", "max_len", "val_fraction", "seed", "batch_size",
                   "lr", "min_lr", "warmup_steps", "schedule", "weight_decay", "beta1", "beta2", "eps", "grad_clip",
                   "precision")


class InstructionBatches:
    """Each epoch a seeded shuffle of the training examples; step ``s`` takes its slice,
    each rank its own ``batch_size`` of it (an epoch's remainder is left out, a different
    one each epoch). The position is the step alone, so resuming needs nothing else."""

    def __init__(self, examples, batch_size: int, seed: int, response_only: bool, rank: int = 0, world_size: int = 1,
                 pad_id: int = EOT_TOKEN):
        self.examples, self.batch_size, self.seed, self.response_only = examples, batch_size, seed, response_only
        self.pad_id = pad_id
        self.rank, self.world_size, self.step = rank, world_size, 0
        self.steps_per_epoch = len(examples) // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise TrainingError(f"{len(examples)} training examples do not fill one step of {batch_size} examples x "
                                f"{world_size} processes; lower --batch-size or --val-fraction")

    def next_batch(self):
        epoch, k = divmod(self.step, self.steps_per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch))
        start = (k * self.world_size + self.rank) * self.batch_size
        self.step += 1
        return collate([self.examples[i] for i in order[start : start + self.batch_size]], self.response_only,
                       self.pad_id)

    def state_dict(self) -> dict:
        return {"step": self.step, "n_examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if state["n_examples"] != len(self.examples):
            raise TrainingError(f"the run was saved with {state['n_examples']} training examples, the data now give "
                                f"{len(self.examples)}; resume with the data and settings the run started with")
        self.step = state["step"]


def split_records(records: list[dict], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training and held-out records: a seeded shuffle, at least one held out."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(records) * val_fraction))
    if n_val >= len(records):
        raise InstructionDataError(f"{len(records)} record(s) leave nothing to train on after holding out "
                                   f"{n_val}; give more records or a smaller --val-fraction")
    return sorted(order[n_val:]), sorted(order[:n_val])


@torch.no_grad()
def held_out_loss(model, examples, batch_size: int, response_only: bool, autocast) -> float:
    """Mean masked loss over the held-out examples, per token (eval mode; mode restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            inputs, labels = collate(examples[start : start + batch_size], response_only, model.tokenizer.pad_token_id)
            n = int((labels != IGNORE).sum())
            with autocast():
                total += next_token_loss(model(inputs.to(device)), labels=labels).item() * n
            count += n
    finally:
        model.train(was_training)
    return total / count


@torch.no_grad()
def respond(model, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy continuation of ``prompt``, up to <|endoftext|>."""
    n_ctx = model.cfg.n_ctx
    tokens = model.tokenizer.encode_ordinary(prompt)[-(n_ctx - 1):]
    new = min(max_new_tokens, n_ctx - len(tokens))
    device = next(model.parameters()).device
    out = model.generate(torch.tensor([tokens], device=device), new, temperature=0, stop_at_eos=True)
    reply = out[0, len(tokens):].tolist()
    eos = model.tokenizer.eos_token_id
    return model.to_string(reply[: reply.index(eos)] if eos in reply else reply)


def finetune(cfg: FinetuneConfig, *, stop_after: int | None = None) -> Path:
    """Fine-tune as ``cfg`` describes and return the run directory (``stop_after``: stop
    there as an interrupt would, for tests)."""
    d = distributed.setup(cfg.device, cfg.ddp_timeout_s)
    if d.device.type == "cpu":
        keep_freed_memory()
    try:
        return _finetune(cfg, d, stop_after)
    finally:
        distributed.teardown(d)


def _finetune(cfg: FinetuneConfig, d: distributed.Dist, stop_after: int | None) -> Path:
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, d.device))
    if cfg.precision == "fp16" and d.device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA GPU; on the CPU use bf16 or fp32")
    template, records = read_template(cfg.template), read_instructions(cfg.data)
    model = load_model(cfg.init, str(d.device)).train()
    max_len = cfg.max_len or model.cfg.n_ctx
    if max_len > model.cfg.n_ctx:
        raise ConfigError(f"--max-len {max_len} is longer than the model's context of {model.cfg.n_ctx}")
    train_ids, val_ids = split_records(records, cfg.val_fraction, cfg.seed)
    eos = model.tokenizer.eos_token_id
    encoded = [encode(model.tokenizer, fill(template, r), r["output"], max_len, eos) for r in records]
    # An example whose prompt fills the whole context has no response tokens left to learn.
    usable = [i for i in train_ids if len(encoded[i].tokens) > encoded[i].n_prompt]
    if not usable:
        raise InstructionDataError(f"every training prompt fills the {max_len}-token context; shorten the prompts")
    batches = InstructionBatches([encoded[i] for i in usable], cfg.batch_size, cfg.seed, cfg.response_loss_only,
                                 d.rank, d.world_size, model.tokenizer.pad_token_id)
    val_examples = [encoded[i] for i in val_ids if len(encoded[i].tokens) > encoded[i].n_prompt]
    if not val_examples:
        raise InstructionDataError(f"every held-out prompt fills the {max_len}-token context; shorten the prompts")
    max_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * batches.steps_per_epoch
    run_dir = Path(cfg.out).resolve()
    cfg = dataclasses.replace(cfg, out=str(run_dir), max_steps=max_steps)

    mine = cfg.to_dict()
    prepare_run_dir(cfg, d, lambda saved: sorted(k for k in FIXED_ON_RESUME if saved.get(k) != mine[k]))
    view = run_view(cfg, model.cfg, max_len, d.world_size)
    state = TrainState(model, make_optimizer(model, cfg, d.device),
                       torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16"), batches,
                       rank=d.rank, seed=cfg.seed)
    torch.manual_seed(cfg.seed + d.rank)
    if cfg.resume:
        restore(run_dir, state)
    if d.is_main:
        derived = {"n_train": len(batches.examples), "n_held_out": len(val_ids), "held_out_ids": val_ids,
                   "dropped_too_long": len(train_ids) - len(usable), "steps_per_epoch": batches.steps_per_epoch,
                   "n_params": model.cfg.n_params(), "world_size": d.world_size, "device": str(d.device),
                   "model": model.cfg.to_dict(), "template": template}
        rundir.write_config(run_dir, cfg.to_dict(), derived)
        rundir.trim_metrics(run_dir, state.step)
    forward = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None) if d.enabled else model
    setup = Setup(view, d, 1, make_autocast(cfg.precision, d.device), forward, labelled_batch_loss)

    log = Logger(view, d, run_dir, max_steps, state.step, flops_per_token(model.cfg, max_len))
    run_loop(run_dir, state, setup, log, max_steps, set(checkpoint_steps(max_steps, cfg.ckpt_every, log_spaced=False)),
             stop_after, "python -m training.finetune",
             evaluate=lambda step: held_out_loss(model, val_examples, cfg.batch_size, cfg.response_loss_only,
                                                 setup.autocast))
    if state.step == max_steps and d.is_main:
        write_responses(model, run_dir, records, val_ids, template, cfg.max_new_tokens)
    distributed.barrier(d)
    return run_dir


def labelled_batch_loss(forward: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device) -> torch.Tensor:
    """The loss of one ``InstructionBatches`` batch: the labels that are not IGNORE."""
    inputs, labels = batch
    return next_token_loss(forward(inputs.to(device)), labels=labels.to(device))


def run_view(cfg: FinetuneConfig, mcfg, max_len: int, world_size: int) -> SimpleNamespace:
    """``cfg`` with what training's Logger, ``run_loop`` and ``save`` also read from a run's
    config. Tokens per step count padded slots: examples x max_len, an upper bound on the
    real tokens."""
    return SimpleNamespace(**cfg.to_dict(), preset=f"a fine-tune of {cfg.init}", model_config=lambda: mcfg,
                           global_batch_tokens=cfg.batch_size * max_len * world_size)


def write_responses(model, run_dir: Path, records: list[dict], ids: list[int], template: dict, max_new_tokens: int):
    """The model's responses to the held-out records, one JSON line each, for the judge."""
    rows = []
    for i in ids:
        r = records[i]
        rows.append({"id": i, "instruction": r["instruction"], "input": r["input"], "output": r["output"],
                     "response": respond(model, fill(template, r), max_new_tokens), "model": run_dir.name})
    atomic_write(run_dir / "responses.jsonl", "".join(json.dumps(row) + "\n" for row in rows))


def config_from_args(argv: list[str] | None = None) -> FinetuneConfig:
    p = argparse.ArgumentParser(prog="python -m training.finetune", argument_default=argparse.SUPPRESS,
                                description="Instruction fine-tuning on Alpaca-format data; writes a run directory "
                                            "like training.train's, and responses.jsonl for the held-out records.")
    for f in dataclasses.fields(FinetuneConfig):
        choices = {"precision": list(PRECISIONS), "schedule": list(SCHEDULES)}.get(f.name)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=f.metadata["help"], choices=choices,
                       **_arg_type(f))
    p.add_argument("--whole-sequence", dest="response_loss_only", action="store_false",
                   help="put the loss on prompt and response tokens alike")
    flags = vars(p.parse_args(argv))
    if flags.get("resume") and "out" in flags and rundir.has_config(flags["out"]):  # the run's settings, then the flags
        base = rundir.read_config(flags["out"])
        base.pop("derived", None)
        flags = {**base, **flags}
    return FinetuneConfig(**flags)


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: finetune(config_from_args(argv)),
                       (ConfigError, TrainingError, CheckpointError, InstructionDataError, AnalysisError))


if __name__ == "__main__":
    sys.exit(main())
