"""TrainConfig: everything that describes a training run, as one JSON-serialisable dataclass.

The command line, an optional TOML/JSON file and ``training.train.train(cfg)`` all meet
here. ``RUN/config.json`` holds ``TrainConfig.to_dict()`` of the fully resolved config,
so ``TrainConfig.from_dict(json.load(...))`` describes the run exactly.

>>> cfg = TrainConfig(preset="tiny", model={"dropout": 0.0}, max_steps=10)
>>> cfg.model_config().n_layers
2
"""

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from hooked_gpt2 import ConfigError, GPT2Config
from hooked_gpt2.config import PRESETS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is the same parser (a dependency there, see pyproject.toml)
    import tomli as tomllib

from . import rundir

DEFAULT_DATA = "data/python-stdlib"  # the embedded corpus in GPT-2's token ids, prepared on first use
# The demo trains over a compact vocabulary of that corpus (data_prep.compact: its 2,047 most
# frequent training tokens plus one id for every other), also made on first use: over GPT-2's
# 50,257 tokens nearly all of a step of the demo's small model is the unembedding.
DEMO_DATA, DEMO_VOCAB = "data/python-stdlib-v2048", 2048
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


# Settings whose default depends on the preset (a field left None becomes the preset's value,
# which config.json records). The demo's are its induction recipe (docs/induction-recipe.md,
# fifth session): half the training sequences start with a repeated span (a quarter formed
# no head); 300 warm-up steps and a cosine decay, with which the head forms in every seed
# tried, well before the end, where at a constant rate it formed anywhere from step 1,400 to
# 2,800 of 3,000; and fp32, which at this size is faster on a CPU than bf16 autocast, whose
# rounding differs between instruction sets (enough to move or prevent the head's formation).
PRESET_TRAINING = {"demo": {"repeat_fraction": 0.5, "precision": "fp32", "schedule": "cosine", "warmup_steps": 300}}
OTHER_PRESETS_TRAINING = {"repeat_fraction": 0.0, "precision": "auto", "schedule": "constant", "warmup_steps": 30}


def _by_preset(name: str) -> str:
    """The help text's "default ..." for a field whose default ``PRESET_TRAINING`` sets."""
    return (f"default {PRESET_TRAINING['demo'][name]} for the demo preset, {OTHER_PRESETS_TRAINING[name]} for "
            "every other")


def preset_training(preset: str) -> dict:
    """The training settings ``preset`` gives the fields left unset."""
    return PRESET_TRAINING.get(preset, OTHER_PRESETS_TRAINING)


def default_data(preset: str) -> tuple[str, int | None]:
    """Where a run of ``preset`` without ``--data`` finds its data (prepared on first use), and
    the size of the compact vocabulary it is rewritten over (None: GPT-2's ids)."""
    return (DEMO_DATA, DEMO_VOCAB) if preset == "demo" else (DEFAULT_DATA, None)


@dataclass
class TrainConfig:
    """A training run. The defaults train the ``demo`` preset (see the README)."""

    # What to train, on what, where.
    preset: str = _help("model shape to start from: " + ", ".join(PRESETS), default="demo")
    model: dict = _help("GPT2Config fields overriding the preset", default_factory=dict)
    data: str | None = _help(
        f"prepared token directory (data_prep); default {DEFAULT_DATA} (the demo preset: {DEMO_DATA}, its "
        f"{DEMO_VOCAB}-token compact vocabulary), prepared on first use", default=None
    )
    out: str | None = _help("run directory; default runs/demo or runs/<preset>-<time>", default=None)
    resume: bool = _help("continue the run in --out from its latest resumable checkpoint", default=False)
    overwrite: bool = _help("delete an existing run directory at --out and start afresh", default=False)
    seed: int = _help("seed for initialisation, dropout and sampling", default=1337)
    data_order_seed: int | None = _help(
        "seed of the shuffled order in which the training sequences are read (resumable); default 0; off = "
        "the stream in order, as llm.c reads it", default=0
    )
    # Repeated spans (data_prep.repeats): the data that makes induction heads form quickly.
    repeat_fraction: float | None = _help(
        "fraction of training sequences that start with a span of random tokens written twice, then go on "
        "with natural text (0 = natural text only); the tokens come from the training split's most frequent "
        f"ones. {_by_preset('repeat_fraction').capitalize()}",
        default=None)
    repeat_vocab: int = _help("the repeated spans draw their tokens from this many most frequent training tokens",
                              default=256)
    repeat_span: int = _help("longest repeated span, in tokens (lengths are uniform from half this to this)",
                             default=16)
    # Batch: each optimizer step sees global_batch_tokens tokens, in micro-batches of
    # batch_size sequences per process, accumulated as needed.
    batch_size: int = _help("micro-batch size per process, in sequences", default=32)
    seq_len: int | None = _help("tokens per training sequence; default the model's n_ctx", default=None)
    global_batch_tokens: int | None = _help(
        "tokens per optimizer step over all processes and accumulation steps; "
        "default one micro-batch per process (no accumulation)",
        default=None,
    )
    max_steps: int | None = _help("optimizer steps to train for (or give --max-tokens)", default=3000)
    max_tokens: int | None = _help("token budget; sets max_steps = ceil(max_tokens / global_batch_tokens), at least 1", default=None)
    # Optimizer and schedule.
    lr: float = _help("peak learning rate", default=3e-3)
    min_lr: float = _help("learning rate at the end of the decay", default=3e-4)
    warmup_steps: int | None = _help(f"linear warm-up steps from 0 to --lr; {_by_preset('warmup_steps')}", default=None)
    schedule: str | None = _help("after warm-up: cosine or linear decay to --min-lr, or constant; "
                                 + _by_preset("schedule"), default=None)
    weight_decay: float = _help("AdamW decoupled weight decay on matrices (0 = off)", default=0.1)
    beta1: float = _help("AdamW beta1", default=0.9)
    beta2: float = _help("AdamW beta2", default=0.95)
    eps: float = _help("AdamW epsilon", default=1e-8)
    grad_clip: float | None = _help("clip the global gradient norm to this (off/0 = no clipping)", default=1.0)
    # Hardware.
    precision: str | None = _help(
        "auto (bf16 where the GPU has it natively, else fp16; bf16 on the CPU), fp32, bf16 (autocast, CPU or "
        f"CUDA) or fp16 (autocast + grad scaler, CUDA); {_by_preset('precision')}; config.json records the one "
        "chosen", default=None)
    compile: bool = _help("torch.compile the model", default=False)
    device: str = _help("auto (CUDA if available), cpu, cuda or cuda:N", default="auto")
    ddp_timeout_s: int = _help("seconds a process waits on the others before the run fails", default=600)
    # Evaluation, logging, checkpoints.
    eval_every: int = _help("steps between validation-loss evaluations (also at step 0 and the end)", default=100)
    eval_batches: int = _help("fixed validation batches per evaluation", default=4)
    eval_batch_size: int = _help("sequences per validation batch (independent of the training batch, "
                                 "so runs with different batch layouts compare)", default=8)
    log_every: int = _help("steps between metrics.jsonl rows", default=5)
    sample_tokens: int = _help("tokens per sampled generation at each evaluation (0 = none)", default=24)
    sample_every: int = _help("steps between sampled generations (also at step 0 and the end)", default=500)
    sample_prompts: list = _help(
        "prompts for the sampled generations", default_factory=lambda: ["def ", "import os\n"]
    )
    ckpt_every: int = _help("steps between checkpoints after the log-spaced ones", default=100)
    ckpt_log_spaced: bool = _help("also checkpoint at steps 1, 2, 4, 8, ... below --ckpt-every", default=True)
    keep_resume: int = _help("keep optimizer/data/RNG resume state in this many latest checkpoints", default=1)
    progress: bool = _help("show a progress bar", default=True)
    tensorboard: bool = _help("also log to RUN/tensorboard when tensorboard is installed", default=True)
    peak_flops: float | None = _help("one device's peak FLOP/s for MFU (per process under torchrun); "
                                     "default measured (CPU) or looked up (GPU)", default=None)

    def __post_init__(self):
        for name, value in preset_training(self.preset).items():  # the preset's own: config.json records it
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.validate()

    def model_config(self) -> GPT2Config:
        """The GPT2Config this run trains: the preset with ``model`` overrides applied."""
        unknown = sorted(set(self.model) - {f.name for f in dataclasses.fields(GPT2Config)})
        if unknown:
            raise ConfigError(f"unknown model fields {unknown}")
        return GPT2Config.preset(self.preset, **self.model)

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if not isinstance(self.model, dict):
            raise ConfigError(f"model must be a dict of GPT2Config overrides, got {self.model!r}")
        mcfg = self.model_config()
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("batch_size", "eval_every", "eval_batches", "eval_batch_size", "log_every", "sample_every", "ckpt_every", "ddp_timeout_s"):
            _positive(name, getattr(self, name))
        for name in ("seq_len", "global_batch_tokens", "max_tokens"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.data_order_seed is not None and not (isinstance(self.data_order_seed, int) and self.data_order_seed >= 0):
            raise ConfigError(f"data_order_seed must be a non-negative integer (or unset), got {self.data_order_seed!r}")
        if self.max_steps is None and self.max_tokens is None:
            raise ConfigError("give a length: --max-steps N or --max-tokens N")
        if self.max_steps is not None and not (isinstance(self.max_steps, int) and self.max_steps >= 0):
            raise ConfigError(f"max_steps must be a non-negative integer, got {self.max_steps!r}")
        if self.seq_len is not None and self.seq_len > mcfg.n_ctx:
            raise ConfigError(f"seq_len {self.seq_len} is longer than the model's n_ctx {mcfg.n_ctx}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be positive, or None/'off' for no clipping; got {self.grad_clip!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"need lr > 0 and 0 <= min_lr <= lr; got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 <= self.repeat_fraction <= 1:
            raise ConfigError(f"repeat_fraction must be between 0 and 1, got {self.repeat_fraction!r}")
        _positive("repeat_vocab", self.repeat_vocab)
        if not (isinstance(self.repeat_span, int) and 2 <= self.repeat_span <= self.repeat_vocab):
            raise ConfigError(f"repeat_span must be an integer from 2 to repeat_vocab ({self.repeat_vocab}), "
                              f"got {self.repeat_span!r}")
        if self.repeat_fraction > 0 and 2 * self.repeat_span > self.resolved_seq_len() + 1:
            raise ConfigError(f"repeat_span {self.repeat_span} written twice does not fit a sequence of "
                              f"{self.resolved_seq_len()} tokens; use --repeat-span {(self.resolved_seq_len() + 1) // 2} "
                              f"or less")
        if self.sample_tokens >= mcfg.n_ctx:
            raise ConfigError(f"sample_tokens {self.sample_tokens} leaves no room for a prompt in the model's "
                              f"{mcfg.n_ctx}-token context; use --sample-tokens {mcfg.n_ctx // 2} or fewer")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.keep_resume < 1 or self.sample_tokens < 0:
            raise ConfigError("warmup_steps, weight_decay and sample_tokens must be >= 0, keep_resume >= 1")

    # Batch arithmetic, given the number of processes.
    def resolved_seq_len(self) -> int:
        return self.seq_len or self.model_config().n_ctx

    def grad_accum_steps(self, world_size: int) -> int:
        micro = self.batch_size * self.resolved_seq_len() * world_size
        total = self.global_batch_tokens or micro
        if total % micro:
            raise ConfigError(
                f"global batch of {total} tokens does not divide into micro-batches of "
                f"batch_size {self.batch_size} x seq_len {self.resolved_seq_len()} x {world_size} processes "
                f"= {micro} tokens; choose --global-batch-tokens as a multiple of {micro}"
            )
        return total // micro

    def resolved_max_steps(self, world_size: int) -> int:
        if self.max_tokens is None:
            return self.max_steps
        tokens_per_step = self.batch_size * self.resolved_seq_len() * world_size * self.grad_accum_steps(world_size)
        return max(1, math.ceil(self.max_tokens / tokens_per_step))

    # Serialisation. "model" is written as the full GPT2Config dict; read back, it is a
    # set of overrides that reproduce the same model from the same preset.
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model_config().to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k != "derived"}  # informative, written by train()
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"unknown training config keys {unknown}; valid keys are {sorted(fields)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(read_config_file(path))


# What each field describes. This one declaration decides what a resumed run may change,
# what must match for a study to reuse a run, and which runs compare as replicates of one
# experiment (``changed_fields`` with FIXED_ON_RESUME or EXPERIMENT_ROLES).
ROLES = {
    # What is trained and measured: fixed for a run, shared by the runs of one variant.
    "experiment": ("preset", "model", "data", "seq_len", "global_batch_tokens", "lr", "min_lr", "warmup_steps",
                   "schedule", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "precision",
                   "eval_batches", "eval_batch_size", "repeat_fraction", "repeat_vocab", "repeat_span"),
    # How long: a resumed run may be extended; runs compared must have the same length.
    "length": ("max_steps", "max_tokens"),
    # Which replicate of the experiment: fixed for a run, varies between the runs of a variant
    # (initialisation and dropout noise, data-order noise).
    "replicate": ("seed", "data_order_seed"),
    # How it is computed, not what (batch_size is the micro-batch: the global batch is fixed
    # by global_batch_tokens): may change on resume, ignored when runs are compared.
    "hardware": ("batch_size", "compile", "device", "ddp_timeout_s", "peak_flops"),
    # What one run records and where: may change on resume, ignored when runs are compared.
    "bookkeeping": ("out", "resume", "overwrite", "eval_every", "log_every",
                    "sample_tokens", "sample_every", "sample_prompts", "ckpt_every", "ckpt_log_spaced",
                    "keep_resume", "progress", "tensorboard"),
}
FIXED_ON_RESUME = ("experiment", "replicate")
EXPERIMENT_ROLES = ("experiment", "length")
_declared = [name for names in ROLES.values() for name in names]
assert sorted(_declared) == sorted(f.name for f in dataclasses.fields(TrainConfig)), \
    "every TrainConfig field has exactly one role in ROLES"


def fields_with_roles(*roles: str) -> list[str]:
    return [name for role in roles for name in ROLES[role]]


def changed_fields(saved: dict, cfg: TrainConfig, roles: tuple[str, ...]) -> list[str]:
    """The fields of ``roles`` in which ``cfg`` differs from a run's saved config.json.

    Fields that ``cfg`` leaves for training to resolve (None: the default data, seq_len,
    global batch; max_steps when max_tokens is given) are not compared; a data path is
    compared resolved.
    """
    mine = cfg.to_dict()
    if cfg.data is not None:
        mine["data"] = str(Path(cfg.data).resolve())
    unresolved = {k for k in ("data", "seq_len", "global_batch_tokens") if mine[k] is None}
    if cfg.max_tokens is not None:  # the saved run turned it into max_steps for its world size
        unresolved |= {"max_steps", "max_tokens"}
    return sorted(k for k in fields_with_roles(*roles) if k not in unresolved and saved.get(k) != mine[k])


def _positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def read_config_file(path: str | Path) -> dict:
    """A TOML or JSON file of TrainConfig keys (model overrides in a ``[model]`` table)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        return json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper() or 'JSON'}: {e}") from None


# Command line: one flag per TrainConfig field and per GPT2Config field.
MODEL_HELP = {
    "n_layers": "transformer blocks",
    "d_model": "residual stream width",
    "n_heads": "attention heads per block",
    "d_head": "width of each head (default d_model / n_heads)",
    "d_mlp": "MLP hidden width (default 4 d_model)",
    "n_ctx": "context length (positions embedded)",
    "d_vocab": "vocabulary size (50257 for GPT-2 tokens)",
    "act_fn": "MLP activation: gelu_new (GPT-2's) or gelu",
    "layer_norm_eps": "layer-norm epsilon",
    "dropout": "dropout rate on embeddings, attention and residual outputs (0 or off = none)",
    "qkv_bias": "biases on the Q, K and V projections",
    "tie_embeddings": "share one matrix between embedding and unembedding",
    "attn_only": "attention-only blocks (no MLPs)",
    "init_std": "standard deviation of the initial weights",
    "positional": "positions: learned (GPT-2's absolute embeddings) or rotary (RoPE)",
    "rotary_base": "RoPE base: the slowest rotation's wavelength scale",
    "rotary_dim": "RoPE: dimensions of each head rotated (default d_head)",
    "norm": "normalisation: layernorm (GPT-2's) or rmsnorm",
    "mlp": "MLP: gelu (GPT-2's) or swiglu (gated; d_mlp its hidden width)",
    "qk_norm": "RMSNorm of each head's queries and keys before the dot product",
    "attn_bias": "bias on the attention output projection (QKV's is --qkv-bias)",
    "mlp_bias": "biases on the MLP's linear layers",
}


def _off_or(kind, off_value):
    def parse(text: str):
        return off_value if text.lower() in ("off", "none") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _arg_type(f: dataclasses.Field):
    if f.name == "grad_clip":
        return {"type": _off_or(float, None)}
    if f.name == "data_order_seed":
        return {"type": _off_or(int, None)}
    if f.name == "sample_prompts":
        return {"type": str, "nargs": "*"}
    kinds = {"int": int, "float": float, "str": str, "bool": bool, "int | None": int, "float | None": float,
             "str | None": str}
    kind = kinds[str(f.type) if not isinstance(f.type, type) else f.type.__name__]
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": kind}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train a HookedGPT2 from scratch. With no arguments: the demo preset on the "
        "embedded python-stdlib corpus, into runs/demo. Precedence: defaults < --config file < "
        "(with --resume) the run's saved config < flags.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="TOML or JSON file of training settings (the keys of RUN/config.json)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        choices = {"preset": list(PRESETS), "precision": list(PRECISIONS), "schedule": list(SCHEDULES)}.get(f.name)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=f.metadata["help"],
                       choices=choices, **_arg_type(f))
    group = p.add_argument_group("model overrides (GPT2Config fields; the study's interventions among them)")
    for f in dataclasses.fields(GPT2Config):
        if f.name == "vocab":  # a compact vocabulary comes with its data (data_prep.compact), not from a flag
            continue
        kind = {"dropout": {"type": _off_or(float, 0.0)}}.get(f.name) or _arg_type(f)
        if "type" in kind:
            kind["metavar"] = f.name.upper()
        group.add_argument("--" + f.name.replace("_", "-"), dest="model." + f.name, help=MODEL_HELP[f.name], **kind)
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line into a TrainConfig (raises ConfigError on bad values)."""
    args = vars(build_parser().parse_args(argv))
    base: dict = {}
    if "config" in args:
        base = read_config_file(args.pop("config"))
    flags = {k: v for k, v in args.items() if not k.startswith("model.")}
    model_flags = {k.removeprefix("model."): v for k, v in args.items() if k.startswith("model.")}
    if flags.get("resume"):
        out = flags.get("out") or base.get("out") or default_out(flags.get("preset") or base.get("preset", "demo"))
        if rundir.has_config(out):
            base = {**base, **rundir.read_config(out)}
            base.pop("derived", None)
    merged = {**base, **flags}
    merged["model"] = {**base.get("model", {}), **model_flags}
    return TrainConfig.from_dict(merged)


def default_out(preset: str) -> str:
    if preset == "demo":
        return "runs/demo"
    import time

    return f"runs/{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
