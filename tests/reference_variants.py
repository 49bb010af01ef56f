"""An independent, slow forward for every architecture variant, for the tests: plain torch
in float64, one head and one position at a time where the maths is per position, read
straight from the state dict. It shares no code with ``hooked_gpt2`` and writes each
variant the way its paper does rather than the way the model computes it:

- rotary positions as complex numbers: dimension pair (i, i + rotary_dim / 2) is
  ``z = x_i + j x_{i + rotary_dim/2}``, turned to ``z * exp(j * pos * base^(-2i / rotary_dim))``;
- RMSNorm as ``x / sqrt(mean(x^2) + eps)`` then the weight;
- SwiGLU as ``(silu(x W_gate) * (x W_in)) W_out`` with silu written out;
- QK-norm as that RMSNorm over each head's d_head.

Like ``tests/reference_gpt2.py`` it records every activation under our hook names and
applies edits at them.
"""

import math

import torch

from hooked_gpt2 import GPT2Config, HookedGPT2
from tests.reference_gpt2 import gelu

# Each variant alone, and together; the tests run every one against this reference.
VARIANTS = {
    "gpt2": {},
    "rotary": dict(positional="rotary"),
    "rotary_partial": dict(positional="rotary", rotary_dim=4, rotary_base=50.0),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "qk_norm": dict(qk_norm=True),
    "no_biases": dict(qkv_bias=False, attn_bias=False, mlp_bias=False),
    "llama": dict(positional="rotary", norm="rmsnorm", mlp="swiglu", qkv_bias=False, attn_bias=False,
                  mlp_bias=False, tie_embeddings=False),
    "everything": dict(positional="rotary", rotary_dim=4, norm="rmsnorm", mlp="swiglu", qk_norm=True,
                       attn_bias=False),
    "attn_only_rotary": dict(positional="rotary", attn_only=True, norm="rmsnorm"),
}


def make_variant(name: str, **overrides) -> HookedGPT2:
    """A small model of the variant with every weight (norm weights, biases) non-trivial."""
    # d_head differs from d_model // n_heads so that mixing up the two axes fails; a large
    # init_std makes attention sharp and edits visible in the logits.
    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_head=6, d_mlp=40, n_ctx=16, d_vocab=100, init_std=0.3)
    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config(**{**cfg, **VARIANTS[name], **overrides})).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname or ".ln" in pname or pname.startswith("ln_final"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def rotate(x: torch.Tensor, rotary_dim: int, base: float) -> torch.Tensor:
    """x [batch pos head d_head] rotated by position, the first rotary_dim dims of each head."""
    half = rotary_dim // 2
    out = x.clone()
    for pos in range(x.shape[1]):
        for i in range(half):
            angle = pos * base ** (-2 * i / rotary_dim)
            z = torch.complex(x[:, pos, :, i], x[:, pos, :, i + half]) * complex(math.cos(angle), math.sin(angle))
            out[:, pos, :, i], out[:, pos, :, i + half] = z.real, z.imag
    return out


@torch.no_grad()
def reference_forward(model, tokens: torch.Tensor, edits: dict | None = None):
    """Logits ``[batch pos d_vocab]`` (float64) and ``{hook name: activation}``; ``edits``
    maps a hook name to ``fn(activation) -> activation`` applied there (on a copy)."""
    cfg = model.cfg
    w = {name: tensor.detach().double().clone() for name, tensor in model.state_dict().items()}
    edits = edits or {}
    acts: dict[str, torch.Tensor] = {}

    def point(name, x):
        if name in edits:
            x = edits[name](x.clone())
        acts[name] = x
        return x

    def norm(prefix, x):
        if cfg.norm == "rmsnorm":
            scale = point(prefix + "hook_scale", torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.layer_norm_eps))
            return point(prefix + "hook_normalized", x / scale) * w[prefix + "weight"]
        # hook_normalized before the weight and bias, as TransformerLens (>= 3.0) has it.
        centred = x - x.mean(-1, keepdim=True)
        scale = point(prefix + "hook_scale", (centred.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_eps).sqrt())
        return point(prefix + "hook_normalized", centred / scale) * w[prefix + "weight"] + w[prefix + "bias"]

    def linear(x, prefix):
        return x @ w[prefix + "weight"].T + w.get(prefix + "bias", 0.0)

    batch, n_pos = tokens.shape
    H, dh = cfg.n_heads, cfg.d_head
    resid = point("hook_embed", w["embed.weight"][tokens])
    if cfg.positional == "learned":
        resid = resid + point("hook_pos_embed", w["pos_embed.weight"][:n_pos].expand(batch, n_pos, cfg.d_model))
    future = torch.ones(n_pos, n_pos, dtype=torch.bool).triu(1)
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        resid = point(p + "hook_resid_pre", resid)
        x = norm(p + "ln1.", resid)
        W = w[p + "attn.qkv.weight"]
        b = w.get(p + "attn.qkv.bias", torch.zeros(W.shape[0], dtype=W.dtype))

        def project(which, head):
            rows = slice((which * H + head) * dh, (which * H + head + 1) * dh)
            return x @ W[rows].T + b[rows]

        q, k, v = (
            point(p + f"attn.hook_{n}", torch.stack([project(i, h) for h in range(H)], dim=2))
            for i, n in enumerate("qkv")
        )
        if cfg.qk_norm:
            q, k = (
                point(f"{p}attn.{n}_norm.hook_normalized",
                      t / point(f"{p}attn.{n}_norm.hook_scale", torch.sqrt((t * t).mean(-1, keepdim=True) + cfg.layer_norm_eps)))
                * w[f"{p}attn.{n}_norm.weight"]
                for n, t in (("q", q), ("k", k))
            )
        if cfg.positional == "rotary":
            q = point(p + "attn.hook_rot_q", rotate(q, cfg.rotary_dim, cfg.rotary_base))
            k = point(p + "attn.hook_rot_k", rotate(k, cfg.rotary_dim, cfg.rotary_base))
        scores = torch.stack([q[:, :, h] @ k[:, :, h].transpose(1, 2) / math.sqrt(dh) for h in range(H)], dim=1)
        scores = point(p + "attn.hook_attn_scores", scores.masked_fill(future, float("-inf")))
        pattern = point(p + "attn.hook_pattern", torch.softmax(scores, dim=-1))
        z = point(p + "attn.hook_z", torch.stack([pattern[:, h] @ v[:, :, h] for h in range(H)], dim=2))
        W_out = w[p + "attn.out.weight"]
        result = point(
            p + "attn.hook_result",
            torch.stack([z[:, :, h] @ W_out[:, h * dh : (h + 1) * dh].T for h in range(H)], dim=2),
        )
        attn_out = point(p + "hook_attn_out", result.sum(2) + w.get(p + "attn.out.bias", 0.0))
        if cfg.attn_only:
            resid = point(p + "hook_resid_post", resid + attn_out)
            continue
        resid = point(p + "hook_resid_mid", resid + attn_out)
        x = norm(p + "ln2.", resid)
        if cfg.mlp == "swiglu":
            gate = point(p + "mlp.hook_pre", linear(x, p + "mlp.fc_gate."))
            up = point(p + "mlp.hook_pre_linear", linear(x, p + "mlp.fc_in."))
            post = point(p + "mlp.hook_post", gate / (1 + torch.exp(-gate)) * up)
        else:
            pre = point(p + "mlp.hook_pre", linear(x, p + "mlp.fc_in."))
            post = point(p + "mlp.hook_post", gelu(pre, cfg.act_fn))
        mlp_out = point(p + "hook_mlp_out", linear(post, p + "mlp.fc_out."))
        resid = point(p + "hook_resid_post", resid + mlp_out)
    logits = point("unembed.hook_out", point("unembed.hook_in", norm("ln_final.", resid)) @ w["unembed.weight"].T)
    return logits, acts
