"""Import and export Hugging Face Llama checkpoints (``LlamaForCausalLM``).

Llama is GPT-2 with RMSNorm, rotary positions over whole heads, a SwiGLU MLP, no biases
and untied embeddings (``config.LLAMA_ARCHITECTURE``). Both store projections as
``nn.Linear`` ``[out, in]``; Llama keeps Q, K and V apart, which our fused ``qkv`` holds
as rows (q|k|v, head, d_head), and rotates dimension i of a head with i + d_head / 2, as
``components.RotaryEmbedding`` does. Multi-head attention only: grouped-query checkpoints
(fewer key/value heads) are refused. ``hf_interop.from_hf`` / ``save_hf`` dispatch here
on the config's ``model_type``; the tokenizer files written are GPT-2's, as for GPT-2.
"""

import torch

from .checkpoint import CheckpointError, check_stand_in
from .config import ConfigError, GPT2Config
from .tokenizer import D_VOCAB, EOT_TOKEN

# (our name, Hugging Face name) within block i.
BLOCK_MAP = [
    ("ln1.weight", "input_layernorm.weight"),
    ("attn.out.weight", "self_attn.o_proj.weight"),
    ("attn.out.bias", "self_attn.o_proj.bias"),
    ("ln2.weight", "post_attention_layernorm.weight"),
    ("mlp.fc_gate.weight", "mlp.gate_proj.weight"),
    ("mlp.fc_gate.bias", "mlp.gate_proj.bias"),
    ("mlp.fc_in.weight", "mlp.up_proj.weight"),
    ("mlp.fc_in.bias", "mlp.up_proj.bias"),
    ("mlp.fc_out.weight", "mlp.down_proj.weight"),
    ("mlp.fc_out.bias", "mlp.down_proj.bias"),
]
QKV = ("q_proj", "k_proj", "v_proj")  # in the order of our fused rows
TOP_MAP = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("ln_final.weight", "model.norm.weight"),
    ("unembed.weight", "lm_head.weight"),
]


def _rope_theta(hf: dict, source) -> float:
    # transformers 5 nests it in rope_parameters; 4.x kept rope_theta and rope_scaling on top.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise CheckpointError(f"{source} uses {kind!r} rotary scaling; HookedGPT2 implements plain RoPE only")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict, source) -> GPT2Config:
    heads = hf.get("num_attention_heads", 32)
    kv_heads = hf.get("num_key_value_heads") or heads
    if kv_heads != heads:
        raise CheckpointError(
            f"{source} uses grouped-query attention ({kv_heads} key/value heads for {heads} query heads); "
            "HookedGPT2 implements multi-head attention only"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source} uses activation {hf.get('hidden_act')!r}; Llama's SwiGLU needs silu")
    extras = hf.get("hooked_gpt2", {})  # what Llama cannot say: dropout, separate bias flags, a compact vocabulary
    bias = bool(hf.get("attention_bias", False))
    try:
        return GPT2Config(
            n_layers=hf.get("num_hidden_layers", 32),
            d_model=hf.get("hidden_size", 4096),
            n_heads=heads,
            d_head=hf.get("head_dim") or hf.get("hidden_size", 4096) // heads,
            d_mlp=hf.get("intermediate_size", 11008),
            n_ctx=hf.get("max_position_embeddings", 2048),
            d_vocab=hf.get("vocab_size", 32000),
            layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
            dropout=extras.get("dropout", hf.get("attention_dropout", 0.0)),
            qkv_bias=extras.get("qkv_bias", bias),
            attn_bias=extras.get("attn_bias", bias),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            init_std=hf.get("initializer_range", 0.02),
            positional="rotary",
            rotary_base=_rope_theta(hf, source),
            norm="rmsnorm",
            mlp="swiglu",
            vocab=extras.get("vocab"),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: GPT2Config) -> dict[str, torch.Tensor]:
    state = {ours: hf_state[theirs] for ours, theirs in TOP_MAP if theirs in hf_state}
    if cfg.tie_embeddings:
        state.pop("unembed.weight", None)  # the embedding's, shared
    for i in range(cfg.n_layers):
        prefix = f"model.layers.{i}."
        for ours, theirs in BLOCK_MAP:
            if prefix + theirs in hf_state:
                state[f"blocks.{i}.{ours}"] = hf_state[prefix + theirs]
        for kind in ("weight", "bias"):
            parts = [prefix + f"self_attn.{proj}.{kind}" for proj in QKV]
            if all(part in hf_state for part in parts) and (kind == "weight" or cfg.qkv_bias):
                state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([hf_state[part] for part in parts])
            elif kind == "bias":  # Llama's one attention_bias flag: written as zeros when only attn_bias was on
                for part in parts:
                    if part in hf_state:
                        check_stand_in(part, hf_state[part], 0.0, "no QKV bias (qkv_bias=False)")
        if not cfg.attn_bias:  # written as zeros when only the QKV bias was on
            name = prefix + "self_attn.o_proj.bias"
            if name in hf_state:
                check_stand_in(name, hf_state[name], 0.0, "no output-projection bias (attn_bias=False)")
            state.pop(f"blocks.{i}.attn.out.bias", None)
    return state


def export_problems(cfg: GPT2Config) -> list[str]:
    """Why ``cfg`` has no exact LlamaForCausalLM equivalent (empty if it has one)."""
    wanted = dict(positional="rotary", norm="rmsnorm", mlp="swiglu", qk_norm=False, attn_only=False)
    problems = [f"{name}={getattr(cfg, name)!r} (Llama: {value!r})" for name, value in wanted.items()
                if getattr(cfg, name) != value]
    if cfg.positional == "rotary" and cfg.rotary_dim != cfg.d_head:
        problems.append(f"rotary_dim={cfg.rotary_dim} (Llama rotates whole heads: {cfg.d_head})")
    return problems


def hf_config_dict(cfg: GPT2Config) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.d_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.n_ctx,
        "vocab_size": cfg.d_vocab,
        "rms_norm_eps": cfg.layer_norm_eps,
        "rope_theta": cfg.rotary_base,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "attention_bias": cfg.qkv_bias or cfg.attn_bias,
        "mlp_bias": cfg.mlp_bias,
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": EOT_TOKEN if cfg.d_vocab == D_VOCAB else None,
        "eos_token_id": EOT_TOKEN if cfg.d_vocab == D_VOCAB else None,
        "hooked_gpt2": {"dropout": cfg.dropout, "qkv_bias": cfg.qkv_bias, "attn_bias": cfg.attn_bias},
    }


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out = {theirs: ours[mine] for mine, theirs in TOP_MAP if mine in ours}
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    for i in range(cfg.n_layers):
        prefix, block = f"model.layers.{i}.", f"blocks.{i}."
        for mine, theirs in BLOCK_MAP:
            if block + mine in ours:
                out[prefix + theirs] = ours[block + mine]
        attn = model.blocks[i].attn
        weights = ours[block + "attn.qkv.weight"].chunk(3)
        biases = [attn.b_Q.detach().flatten(), attn.b_K.detach().flatten(), attn.b_V.detach().flatten()]
        for proj, weight, bias in zip(QKV, weights, biases):
            out[prefix + f"self_attn.{proj}.weight"] = weight
            if cfg.qkv_bias or cfg.attn_bias:  # Llama's one flag: the absent part as exact zeros
                out[prefix + f"self_attn.{proj}.bias"] = bias
        if cfg.qkv_bias or cfg.attn_bias:
            out[prefix + "self_attn.o_proj.bias"] = attn.b_O.detach()
    return {k: v.contiguous() for k, v in out.items()}
