"""An independent, slow GPT-2 forward for the tests: plain torch, one head at a time,
read straight from the state dict (the fused ``qkv`` rows ordered q|k|v, head, d_head as
in Hugging Face's ``c_attn``). Its forward shares no code with ``hooked_gpt2.model``;
``make_model`` builds the small HookedGPT2 the hook and cache tests compare against it.

It records every activation under our hook names and can apply edits at them, so tests
compare the model's hooks, its cache and hand-written interventions against it.
"""

import math

import torch

from hooked_gpt2 import GPT2Config, HookedGPT2


def gelu(x: torch.Tensor, act_fn: str) -> torch.Tensor:
    if act_fn == "gelu_new":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


@torch.no_grad()
def reference_forward(model, tokens: torch.Tensor, edits: dict | None = None):
    """Logits ``[batch pos d_vocab]`` and ``{hook name: activation}``; ``edits`` maps a
    hook name to ``fn(activation) -> activation`` applied there (on a copy)."""
    cfg = model.cfg
    w = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    edits = edits or {}
    acts: dict[str, torch.Tensor] = {}

    def point(name, x):
        if name in edits:
            x = edits[name](x.clone())
        acts[name] = x
        return x

    def layer_norm(prefix, x):
        centred = x - x.mean(-1, keepdim=True)
        scale = point(prefix + "hook_scale", (centred.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_eps).sqrt())
        # hook_normalized before the weight and bias, as TransformerLens >= 3.0 puts it.
        return point(prefix + "hook_normalized", centred / scale) * w[prefix + "weight"] + w[prefix + "bias"]

    batch, n_pos = tokens.shape
    H, dh = cfg.n_heads, cfg.d_head
    embed = point("hook_embed", w["embed.weight"][tokens])
    pos_embed = point("hook_pos_embed", w["pos_embed.weight"][:n_pos].expand(batch, n_pos, cfg.d_model))
    resid = embed + pos_embed
    future = torch.ones(n_pos, n_pos, dtype=torch.bool).triu(1)
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        resid = point(p + "hook_resid_pre", resid)
        x = layer_norm(p + "ln1.", resid)
        W = w[p + "attn.qkv.weight"]
        b = w.get(p + "attn.qkv.bias", torch.zeros(W.shape[0]))

        def project(which, head):
            rows = slice((which * H + head) * dh, (which * H + head + 1) * dh)
            return x @ W[rows].T + b[rows]

        q, k, v = (
            point(p + f"attn.hook_{n}", torch.stack([project(i, h) for h in range(H)], dim=2))
            for i, n in enumerate("qkv")
        )
        scores = torch.stack([q[:, :, h] @ k[:, :, h].transpose(1, 2) / math.sqrt(dh) for h in range(H)], dim=1)
        scores = point(p + "attn.hook_attn_scores", scores.masked_fill(future, float("-inf")))
        pattern = point(p + "attn.hook_pattern", torch.softmax(scores, dim=-1))
        z = point(p + "attn.hook_z", torch.stack([pattern[:, h] @ v[:, :, h] for h in range(H)], dim=2))
        W_out = w[p + "attn.out.weight"]
        result = point(
            p + "attn.hook_result",
            torch.stack([z[:, :, h] @ W_out[:, h * dh : (h + 1) * dh].T for h in range(H)], dim=2),
        )
        attn_out = point(p + "hook_attn_out", result.sum(2) + w[p + "attn.out.bias"])
        if cfg.attn_only:
            resid = point(p + "hook_resid_post", resid + attn_out)
            continue
        resid = point(p + "hook_resid_mid", resid + attn_out)
        x = layer_norm(p + "ln2.", resid)
        pre = point(p + "mlp.hook_pre", x @ w[p + "mlp.fc_in.weight"].T + w[p + "mlp.fc_in.bias"])
        post = point(p + "mlp.hook_post", gelu(pre, cfg.act_fn))
        mlp_out = point(p + "hook_mlp_out", post @ w[p + "mlp.fc_out.weight"].T + w[p + "mlp.fc_out.bias"])
        resid = point(p + "hook_resid_post", resid + mlp_out)
    final = point("unembed.hook_in", layer_norm("ln_final.", resid))
    logits = point("unembed.hook_out", final @ w["unembed.weight"].T)
    return logits, acts


def reference_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy written out: -log softmax at the target."""
    log_probs = logits[:, :-1] - logits[:, :-1].logsumexp(-1, keepdim=True)
    return -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]


def make_model(**overrides) -> HookedGPT2:
    # d_head differs from d_model // n_heads so that mixing up the two axes fails.
    # A large init_std makes attention patterns sharp and edits visible in the logits.
    cfg = dict(n_layers=3, d_model=32, n_heads=4, d_head=6, d_mlp=40, n_ctx=16, d_vocab=100, init_std=0.3)
    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config(**{**cfg, **overrides})).eval()
    with torch.no_grad():  # non-zero biases and layer-norm weights, so none of them can be dropped silently
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_final"):
                param.add_(0.1 * torch.randn_like(param))
    return model
