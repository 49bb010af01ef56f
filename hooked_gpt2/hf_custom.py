"""Hugging Face exports with our own code: the architectures no native class fits, and
compact vocabularies.

A model that is neither GPT-2- nor Llama-shaped (the demo's rotary positions with
LayerNorm and no MLPs, QK-norm, SwiGLU with LayerNorm, ...) is exported with
``hf_code/modeling_hooked_gpt2.py`` and its configuration class beside the weights, named
in config.json's ``auto_map``, so that ``transformers`` loads it with
``trust_remote_code=True``. Its parameters keep our names, so ``model.safetensors`` is our
state dict and ``config.json`` holds our config's fields, which ``from_hf`` reads back.

A model over a compact vocabulary (``data_prep.compact``) is exported, whatever its
architecture, with ``hf_code/tokenization_hooked_gpt2.py``: GPT-2's byte-pair encoding
mapped to the model's ids, as ``CompactTokenizer`` does. ``hf_interop.save_hf`` chooses.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from .atomic import atomic_path, atomic_write
from .checkpoint import CheckpointError, model_state_for_saving
from .config import ConfigError, GPT2Config
from .tokenizer import D_VOCAB, EOT_TEXT, EOT_TOKEN

CODE = Path(__file__).parent / "hf_code"
ARCHITECTURE = "HookedGPT2ForCausalLM"
MODEL_TYPE = "hooked_gpt2"
MODEL_FILES = ("configuration_hooked_gpt2.py", "modeling_hooked_gpt2.py")
TOKENIZER_FILE = "tokenization_hooked_gpt2.py"
COMPACT_VOCAB_FILE = "compact_vocab.json"
AUTO_MAP = {"AutoConfig": "configuration_hooked_gpt2.HookedGPT2Config",
            "AutoModelForCausalLM": "modeling_hooked_gpt2.HookedGPT2ForCausalLM"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_hooked_gpt2.CompactGPT2Tokenizer", None]}
FIELDS = [f.name for f in dataclasses.fields(GPT2Config)]


def eot_id(cfg: GPT2Config) -> int | None:
    """``<|endoftext|>``'s id in the model's vocabulary (BOS, end of text and padding);
    None for a vocabulary that is neither GPT-2's nor a compact one."""
    if cfg.vocab is not None:
        return cfg.vocab.index(EOT_TOKEN)
    return EOT_TOKEN if cfg.d_vocab == D_VOCAB else None


def hf_config_dict(cfg: GPT2Config) -> dict:
    eot = eot_id(cfg)
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "auto_map": AUTO_MAP, **cfg.to_dict(),
            "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    return model_state_for_saving(model)  # the modeling file uses our parameter names


def config_from_hf(hf: dict, source) -> GPT2Config:
    try:
        return GPT2Config.from_dict({name: hf[name] for name in FIELDS if name in hf})
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: GPT2Config) -> dict[str, torch.Tensor]:
    state = dict(hf_state)
    if cfg.tie_embeddings:
        state.pop("unembed.weight", None)  # a model object's state dict lists the tied matrix twice
    return state


def with_compact_vocab(hf_config: dict, cfg: GPT2Config) -> dict:
    """A native class's config.json for a compact-vocabulary model: its own ids for
    ``<|endoftext|>``, and the vocabulary under ``"hooked_gpt2"`` for ``from_hf``."""
    if cfg.vocab is None or hf_config["model_type"] == MODEL_TYPE:
        return hf_config
    eot = eot_id(cfg)
    return {**hf_config, "bos_token_id": eot, "eos_token_id": eot,
            "hooked_gpt2": {**hf_config.get("hooked_gpt2", {}), "vocab": list(cfg.vocab)}}


def write_model_code(path: Path, hf_config: dict) -> None:
    """The configuration and modeling files config.json's ``auto_map`` names (none for a
    native class)."""
    if hf_config["model_type"] == MODEL_TYPE:
        for name in MODEL_FILES:
            copy_file(CODE / name, path / name)


def write_compact_tokenizer(path: Path, cfg: GPT2Config) -> None:
    """The tokenizer of a compact vocabulary, beside GPT-2's vocab.json and merges.txt
    (``hf_interop.write_hf_tokenizer``), whose tokenizer_config.json this replaces."""
    atomic_write(path / COMPACT_VOCAB_FILE, json.dumps({"ids": list(cfg.vocab)}) + "\n")
    copy_file(CODE / TOKENIZER_FILE, path / TOKENIZER_FILE)
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT, "pad_token": EOT_TEXT}
    tokenizer_config = {"tokenizer_class": "CompactGPT2Tokenizer", "auto_map": TOKENIZER_AUTO_MAP,
                        "model_max_length": cfg.n_ctx, "clean_up_tokenization_spaces": False, **special}
    atomic_write(path / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
    atomic_write(path / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")


def copy_file(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
