"""Checkpoints: ``config.json`` plus ``model.safetensors``; nothing is ever unpickled.

Every file is written atomically (``atomic``), so a crash mid-save leaves the previous
file intact rather than a truncated one.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, atomic_write, current_umask
from .config import ConfigError, GPT2Config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "hooked-gpt2"


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or does not match its config."""


def check_stand_in(name: str, tensor: torch.Tensor, value: float, what: str) -> None:
    """A part of a Hugging Face checkpoint that our config says the model lacks (a bias it
    has not, an attention-only model's MLP) is dropped on loading; that is exact only while
    it still holds the stand-in ``save_hf`` wrote (``value`` everywhere). Anything else (the
    export fine-tuned with transformers, say) would load as a different model: refuse."""
    if not torch.all(tensor == value):
        raise CheckpointError(
            f"{name} is no longer the stand-in save_hf wrote ({value:g} everywhere; largest difference "
            f"{(tensor.float() - value).abs().max().item():.3g}), but the model has {what}: the checkpoint was "
            "changed after export (fine-tuned with transformers, say) and would load as a different model. To "
            "fine-tune an export, write it with save_hf(..., architecture='HookedGPT2ForCausalLM'), whose "
            "parameters are exactly the model's")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file``, atomically, with the permissions of every other file
    we write (safetensors creates its files readable by their owner only, whatever the umask)."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())


def model_state_for_saving(model) -> dict[str, torch.Tensor]:
    """The state dict with tied weights stored once (safetensors refuses shared storage)."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("unembed.weight")
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


def refuse_to_overwrite(path: Path, overwrite: bool, action: str) -> None:
    """Raise unless ``path`` is free to write into: absent, an empty directory, or
    ``overwrite``. Checked before anything is written, so a refusal leaves the old files whole."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a directory: {action} writes a directory; choose another path")
    if overwrite or not path.exists() or not any(path.iterdir()):
        return
    names = sorted(p.name for p in path.iterdir())
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    kind = "a checkpoint" if (path / CONFIG_NAME).is_file() else "a non-empty directory"
    raise CheckpointError(
        f"{path} is already {kind} ({shown}): {action} refuses to replace it. Choose a new directory, or pass "
        "overwrite=True to replace the files it writes (other files there are left as they are)"
    )


def save_pretrained(model, path: str | Path, overwrite: bool = False) -> Path:
    path = Path(path)
    refuse_to_overwrite(path, overwrite, "save_pretrained")
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(model_state_for_saving(model), path / WEIGHTS_NAME, {"format": FORMAT})
    config = {"format": FORMAT, "format_version": 1, **model.cfg.to_dict()}
    atomic_write(path / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return path


def read_json(file: Path, missing: str, damaged: str = ""):
    """The JSON in ``file``; a CheckpointError naming the file when it is missing (followed
    by ``missing``) or is not JSON (followed by ``damaged``)."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: {missing}")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}){damaged}") from None


def load_config(path: str | Path) -> GPT2Config:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"no checkpoint directory at {path}: expected a directory holding {CONFIG_NAME} "
            f"and {WEIGHTS_NAME}, as written by model.save_pretrained()"
        )
    config_file = path / CONFIG_NAME
    data = read_json(config_file, missing=f"{path} is not a complete checkpoint",
                     damaged="; the checkpoint is damaged")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(
            f"{config_file} is not a hooked-gpt2 config (no \"format\": \"{FORMAT}\"); "
            "for a Hugging Face GPT-2 directory use HookedGPT2.from_hf()"
        )
    data = {k: v for k, v in data.items() if k not in ("format", "format_version")}
    try:
        return GPT2Config.from_dict(data)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    weights = Path(path)
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing: the checkpoint has no weights")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{weights} is corrupt or truncated ({e}); save the checkpoint again or restore it from a copy"
        ) from None


def load_state_into(model, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``state`` into ``model``, with one error listing every mismatch."""
    expected = model_state_for_saving(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{name}: file {tuple(state[name].shape)} vs config {tuple(t.shape)}"
        for name, t in expected.items()
        if name in state and state[name].shape != t.shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong_shape:
            problems.append("shape mismatches " + "; ".join(wrong_shape[:5]))
        raise CheckpointError(
            f"{source} does not match its config: {', '.join(problems)}. "
            "The weights and config.json come from different models."
        )
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            if name in state:
                param.data = state[name].to(param.device)


def from_pretrained(cls, path: str | Path, device=None, dtype=None):
    path = Path(path)
    cfg = load_config(path)
    state = load_weights(path / WEIGHTS_NAME)
    with torch.device("meta"):
        model = cls(cfg)
    model.to_empty(device="cpu")
    load_state_into(model, state, path / WEIGHTS_NAME)
    if cfg.tie_embeddings:
        model.unembed.weight = model.embed.weight
    model.eval()
    model.source_dir = path  # save_hf's model card reads the run beside it
    return model.to(device=device, dtype=dtype)
