"""Import and export Hugging Face GPT-2 checkpoints (``GPT2LMHeadModel``).

Hugging Face stores projections as Conv1D, ``[in, out]``; we use ``nn.Linear``,
``[out, in]``, so every matrix is transposed on the way in and out. Both fuse Q, K, V in
the same (q|k|v, head, d_head) order. Exports load with plain
``GPT2LMHeadModel.from_pretrained(dir)``; variants GPT-2 lacks are written as exact
equivalents (a missing QKV bias as zeros, an attention-only model's MLPs as zero maps)
and recorded under ``"hooked_gpt2"`` in config.json so that ``from_hf`` restores them.
Llama-architecture models (``LlamaForCausalLM``) go through ``llama_interop`` instead, and
every other architecture through ``hf_custom`` (our own modeling code, loaded with
``trust_remote_code=True``), as do compact vocabularies' tokenizers: ``from_hf`` and
``save_hf`` choose by the config's ``model_type`` / the model's architecture.
"""

import json
from pathlib import Path

import torch

from . import hf_custom, llama_interop
from .checkpoint import (
    CheckpointError, atomic_save_safetensors, atomic_write, check_stand_in, load_state_into, load_weights, read_json,
    refuse_to_overwrite,
)
from .config import ConfigError, GPT2Config
from .model_card import model_card
from .tokenizer import D_VOCAB, EOT_TEXT, EOT_TOKEN, hf_vocab_and_merges

ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old checkpoints

# (our name, Hugging Face name, transpose?) for block i.
BLOCK_MAP = [
    ("ln1.weight", "ln_1.weight", False),
    ("ln1.bias", "ln_1.bias", False),
    ("attn.qkv.weight", "attn.c_attn.weight", True),
    ("attn.qkv.bias", "attn.c_attn.bias", False),
    ("attn.out.weight", "attn.c_proj.weight", True),
    ("attn.out.bias", "attn.c_proj.bias", False),
    ("ln2.weight", "ln_2.weight", False),
    ("ln2.bias", "ln_2.bias", False),
    ("mlp.fc_in.weight", "mlp.c_fc.weight", True),
    ("mlp.fc_in.bias", "mlp.c_fc.bias", False),
    ("mlp.fc_out.weight", "mlp.c_proj.weight", True),
    ("mlp.fc_out.bias", "mlp.c_proj.bias", False),
]
# The config flag each optional bias follows (GPT-2 always has them; exports write zeros).
BIAS_FLAGS = {"attn.qkv.bias": "qkv_bias", "attn.out.bias": "attn_bias", "mlp.fc_in.bias": "mlp_bias",
              "mlp.fc_out.bias": "mlp_bias"}
TOP_MAP = [
    ("embed.weight", "wte.weight"),
    ("pos_embed.weight", "wpe.weight"),
    ("ln_final.weight", "ln_f.weight"),
    ("ln_final.bias", "ln_f.bias"),
]


def config_from_hf(hf: dict, source) -> GPT2Config:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if hf.get(flag):
            raise CheckpointError(f"{source} sets {flag}, a GPT-2 variant HookedGPT2 does not implement")
    if hf.get("scale_attn_weights", True) is False:
        raise CheckpointError(f"{source} sets scale_attn_weights=false, which HookedGPT2 does not implement")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"{source} uses activation {activation!r}; HookedGPT2 supports {sorted(ACTIVATIONS)}")
    extras = hf.get("hooked_gpt2", {})
    n_embd = hf.get("n_embd", 768)
    try:
        return GPT2Config(
            n_layers=hf.get("n_layer", 12),
            d_model=n_embd,
            n_heads=hf.get("n_head", 12),
            d_mlp=extras.get("d_mlp", hf.get("n_inner") or 4 * n_embd),
            n_ctx=hf.get("n_positions", 1024),
            d_vocab=hf.get("vocab_size", D_VOCAB),
            act_fn=ACTIVATIONS[activation],
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            dropout=hf.get("resid_pdrop", 0.1),
            qkv_bias=extras.get("qkv_bias", True),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            attn_only=extras.get("attn_only", False),
            attn_bias=extras.get("attn_bias", True),
            mlp_bias=extras.get("mlp_bias", True),
            vocab=extras.get("vocab"),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: GPT2Config) -> dict[str, torch.Tensor]:
    hf_state = {k.removeprefix("transformer."): v for k, v in hf_state.items() if not k.endswith(IGNORED_SUFFIXES)}
    state = {}
    for ours, theirs in TOP_MAP:
        if theirs in hf_state:
            state[ours] = hf_state[theirs]
    for i in range(cfg.n_layers):
        for ours, theirs, transpose in BLOCK_MAP:
            name = f"h.{i}.{theirs}"
            if cfg.attn_only and (ours.startswith("ln2.") or ours.startswith("mlp.")):
                if name in hf_state:  # the MLP that adds nothing (its LayerNorm gain 1, all else 0)
                    check_stand_in(name, hf_state[name], 1.0 if ours == "ln2.weight" else 0.0, "no MLPs (attn_only)")
                continue
            if ours in BIAS_FLAGS and not getattr(cfg, BIAS_FLAGS[ours]):
                if name in hf_state:
                    check_stand_in(name, hf_state[name], 0.0, f"no such bias ({BIAS_FLAGS[ours]}=False)")
                continue
            ours, theirs = f"blocks.{i}.{ours}", name
            if theirs in hf_state:
                tensor = hf_state[theirs]
                state[ours] = tensor.T.contiguous() if transpose else tensor
    if not cfg.tie_embeddings and "lm_head.weight" in hf_state:
        state["unembed.weight"] = hf_state["lm_head.weight"]
    return state


def hf_format(hf_config: dict, source):
    """The (config_from_hf, state_from_hf) pair for a Hugging Face config's model_type."""
    formats = {
        "gpt2": (config_from_hf, state_from_hf),
        "llama": (llama_interop.config_from_hf, llama_interop.state_from_hf),
        hf_custom.MODEL_TYPE: (hf_custom.config_from_hf, hf_custom.state_from_hf),
    }
    model_type = hf_config.get("model_type", "gpt2")
    if model_type not in formats:
        raise CheckpointError(f"{source} is a {model_type!r} model; HookedGPT2 loads {' and '.join(formats)}")
    return formats[model_type]


def from_hf(cls, dir_or_model, device=None, dtype=None):
    if isinstance(dir_or_model, (str, Path)):
        path = Path(dir_or_model)
        hf_config = read_json(path / "config.json", missing=f"{path} is not a Hugging Face model directory")
        read_config, read_state = hf_format(hf_config, path)
        cfg = read_config(hf_config, path)
        hf_state, source = read_hf_weights(path), path
    else:
        source = type(dir_or_model).__name__
        hf_config = dir_or_model.config.to_dict()
        read_config, read_state = hf_format(hf_config, source)
        cfg = read_config(hf_config, source)
        # Copies: the caller's model keeps its tensors whatever we later do to ours
        # (training steps, weight processing). A directory's tensors are fresh anyway.
        hf_state = {name: tensor.detach().clone() for name, tensor in dir_or_model.state_dict().items()}
    model = cls(cfg)
    load_state_into(model, read_state(hf_state, cfg), source)
    if cfg.tie_embeddings:
        model.unembed.weight = model.embed.weight
    model.eval()
    return model.to(device=device, dtype=dtype)


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` (single or sharded), else ``pytorch_model.bin`` loaded with
    ``weights_only=True`` so that no pickled code runs."""
    if (path / "model.safetensors").is_file():
        return load_weights(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_weights(path / shard))
        return state
    if (path / "pytorch_model.bin").is_file():
        try:
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path / 'pytorch_model.bin'} could not be read safely ({e})") from None
    raise CheckpointError(f"{path} holds no model.safetensors or pytorch_model.bin")


def hf_config_dict(cfg: GPT2Config) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": cfg.act_fn,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": 1 if cfg.attn_only else cfg.d_mlp,
        "n_positions": cfg.n_ctx,
        "vocab_size": cfg.d_vocab,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "initializer_range": cfg.init_std,
        "hooked_gpt2": {
            "qkv_bias": cfg.qkv_bias, "attn_only": cfg.attn_only, "d_mlp": cfg.d_mlp,
            "attn_bias": cfg.attn_bias, "mlp_bias": cfg.mlp_bias,
        },
    }


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out = {f"transformer.{theirs}": ours[mine] for mine, theirs in TOP_MAP}
    for i in range(cfg.n_layers):
        for mine, theirs, transpose in BLOCK_MAP:
            mine, theirs = f"blocks.{i}.{mine}", f"transformer.h.{i}.{theirs}"
            if mine in ours:
                out[theirs] = ours[mine].T if transpose else ours[mine]
        # Exact stand-ins for parts GPT-2 always has: zero biases, and for an
        # attention-only model an MLP that adds zero (gelu(0) = 0, zero output weights).
        zeros = ours[f"blocks.{i}.attn.qkv.weight"].new_zeros
        if not cfg.qkv_bias:
            out[f"transformer.h.{i}.attn.c_attn.bias"] = zeros(3 * cfg.n_heads * cfg.d_head)
        if not cfg.attn_bias:
            out[f"transformer.h.{i}.attn.c_proj.bias"] = zeros(cfg.d_model)
        if not cfg.mlp_bias and not cfg.attn_only:
            out[f"transformer.h.{i}.mlp.c_fc.bias"] = zeros(cfg.d_mlp)
            out[f"transformer.h.{i}.mlp.c_proj.bias"] = zeros(cfg.d_model)
        if cfg.attn_only:
            out[f"transformer.h.{i}.ln_2.weight"] = zeros(cfg.d_model) + 1
            out[f"transformer.h.{i}.ln_2.bias"] = zeros(cfg.d_model)
            out[f"transformer.h.{i}.mlp.c_fc.weight"] = zeros(cfg.d_model, 1)
            out[f"transformer.h.{i}.mlp.c_fc.bias"] = zeros(1)
            out[f"transformer.h.{i}.mlp.c_proj.weight"] = zeros(1, cfg.d_model)
            out[f"transformer.h.{i}.mlp.c_proj.bias"] = zeros(cfg.d_model)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ours["unembed.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def gpt2_export_problems(cfg: GPT2Config) -> list[str]:
    """Why ``cfg`` has no exact GPT2LMHeadModel equivalent (empty if it has one)."""
    gpt2 = GPT2Config()
    problems = [f"{name}={getattr(cfg, name)!r} (GPT-2: {getattr(gpt2, name)!r})"
                for name in ("positional", "norm", "mlp", "qk_norm") if getattr(cfg, name) != getattr(gpt2, name)]
    if cfg.n_heads * cfg.d_head != cfg.d_model:
        problems.append(f"n_heads * d_head = {cfg.n_heads} * {cfg.d_head} != d_model {cfg.d_model}")
    return problems


def export_plan(cfg: GPT2Config) -> tuple[str, list[str]]:
    """The Hugging Face class ``save_hf`` exports ``cfg`` as: ``GPT2LMHeadModel`` or
    ``LlamaForCausalLM`` where one fits exactly, else our own code's
    ``HookedGPT2ForCausalLM``; and why the native classes do not fit (empty if one does)."""
    gpt2_problems, llama_problems = gpt2_export_problems(cfg), llama_interop.export_problems(cfg)
    if not gpt2_problems:
        return "GPT2LMHeadModel", []
    if not llama_problems:
        return "LlamaForCausalLM", []
    return hf_custom.ARCHITECTURE, [f"as GPT-2 it has {', '.join(gpt2_problems)}",
                                    f"as Llama it has {', '.join(llama_problems)}"]


# Each export's (state dict, config.json) writers, by the class it loads as.
EXPORTS = {
    "GPT2LMHeadModel": (hf_state_dict, hf_config_dict),
    "LlamaForCausalLM": (llama_interop.hf_state_dict, llama_interop.hf_config_dict),
    hf_custom.ARCHITECTURE: (hf_custom.hf_state_dict, hf_custom.hf_config_dict),
}


def save_hf(model, path, source=None, architecture: str | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` as the Hugging Face class ``export_plan`` chooses, or as
    ``architecture`` (``HookedGPT2ForCausalLM`` exports any model with our own code).
    A directory that exists and is not empty is refused unless ``overwrite=True``."""
    refuse_to_overwrite(Path(path), overwrite, "save_hf")
    cfg = model.cfg
    planned, _ = export_plan(cfg)
    architecture = architecture or planned
    if architecture not in (planned, hf_custom.ARCHITECTURE):
        raise ConfigError(f"this model cannot be exported exactly as {architecture}; it exports as {planned}, or as "
                          f"{hf_custom.ARCHITECTURE} with architecture={hf_custom.ARCHITECTURE!r}")
    write_state, write_config = EXPORTS[architecture]
    state, hf_config = write_state(model), hf_custom.with_compact_vocab(write_config(cfg), cfg)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(state, path / "model.safetensors", {"format": "pt"})
    atomic_write(path / "config.json", json.dumps(hf_config, indent=2) + "\n")
    generation = {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"]}
    atomic_write(path / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    hf_custom.write_model_code(path, hf_config)
    if cfg.vocab is not None or cfg.d_vocab == D_VOCAB:
        write_hf_tokenizer(path, cfg.n_ctx)
    if cfg.vocab is not None:
        hf_custom.write_compact_tokenizer(path, cfg)
    atomic_write(path / "README.md", model_card(cfg, source or getattr(model, "source_dir", None),
                                                  architecture=architecture))
    return path


def write_hf_tokenizer(path: Path, n_ctx: int) -> None:
    """GPT-2's tokenizer files (vocab.json, merges.txt), rebuilt from the shipped ranks."""
    vocab, merges = hf_vocab_and_merges()
    atomic_write(path / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write(path / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": n_ctx, "add_prefix_space": False, **special}
    atomic_write(path / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
    atomic_write(path / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
