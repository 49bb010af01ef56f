"""Architecture variants: small components chosen once, when the model is built.

RMSNorm, rotary positions (RoPE), QK-norm and the SwiGLU MLP, hooked with
TransformerLens's names: RMSNorm's ``hook_scale`` and ``hook_normalized`` (before the
weight, as TransformerLens does), ``attn.hook_rot_q`` / ``attn.hook_rot_k`` (after
rotation; ``hook_q`` / ``hook_k`` stay before it), ``attn.q_norm.*`` / ``attn.k_norm.*``
for QK-norm, and ``mlp.hook_pre`` (the gate), ``mlp.hook_pre_linear`` and ``mlp.hook_post``
for SwiGLU. ``GPT2Config``'s defaults use none of them; ``hooked_gpt2.model`` picks them.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from .config import GPT2Config
from .hook_points import HookPoint

QK = tuple[Float[Tensor, "batch pos head_index d_head"], Float[Tensor, "batch pos head_index d_head"]]


def bias_or_zeros(linear: nn.Linear) -> Float[Tensor, "d_out"]:
    """A linear layer's bias, or zeros when it has none (so b_O, b_in etc. always exist)."""
    if linear.bias is None:
        return linear.weight.new_zeros(linear.weight.shape[0])
    return linear.bias


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring and bias.

    ``length`` is the normalised axis (d_model; d_head for QK-norm)."""

    def __init__(self, cfg: GPT2Config, length: int | None = None):
        super().__init__()
        self.eps = cfg.layer_norm_eps
        self.weight = nn.Parameter(torch.ones(length or cfg.d_model))
        self.hook_scale = HookPoint()  # [... 1]
        self.hook_normalized = HookPoint()  # [... length], before the weight

    w = property(lambda self: self.weight)  # TransformerLens's name

    def forward(self, x: Float[Tensor, "... length"]) -> Float[Tensor, "... length"]:
        # In the weight's precision (float32 under autocast, as F.layer_norm is there, and
        # the fused kernel wants input and weight alike), returned in the input's.
        x_in = x.to(self.weight.dtype)
        if not (self.hook_scale.has_hooks() or self.hook_normalized.has_hooks()):
            return F.rms_norm(x_in, x.shape[-1:], self.weight, self.eps).to(x.dtype)
        scale = self.hook_scale((x_in.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return (self.hook_normalized(x_in / scale) * self.weight).to(x.dtype)


class RMSNormPre(nn.Module):
    """An RMSNorm whose weight was folded into the weights that read it
    (``processing.fold_ln``): scale only, TransformerLens's ``RMSNormPre``."""

    def __init__(self, cfg: GPT2Config, length: int | None = None):
        super().__init__()
        self.eps = cfg.layer_norm_eps
        self.hook_scale = HookPoint()  # [... 1]
        self.hook_normalized = HookPoint()  # [... length]

    def forward(self, x: Float[Tensor, "... length"]) -> Float[Tensor, "... length"]:
        if not (self.hook_scale.has_hooks() or self.hook_normalized.has_hooks()):
            return F.rms_norm(x, x.shape[-1:], None, self.eps)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale)


class RotaryEmbedding(nn.Module):
    """Rotary positions (RoPE): rotates the first ``rotary_dim`` dimensions of each head's
    queries and keys by angles proportional to their position, so that their dot product
    depends on the positions' difference only. Dimension i pairs with i + rotary_dim / 2
    (GPT-NeoX's and Hugging Face Llama's layout), at frequency base^(-2i / rotary_dim)."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.rotary_dim = cfg.rotary_dim
        # As Hugging Face computes them, in float32, so that Llama weights give the same logits.
        # Derived from the config, so neither parameters nor buffers: checkpoints leave them
        # out, and a model built on the meta device and filled from a checkpoint (as
        # from_pretrained does) keeps them. On the CPU here; moved to the input's device once.
        exponents = torch.arange(0, cfg.rotary_dim, 2, dtype=torch.int64, device="cpu").float() / cfg.rotary_dim
        inv_freq = 1.0 / (cfg.rotary_base**exponents)
        angles = torch.outer(torch.arange(cfg.n_ctx, device="cpu").float(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [n_ctx rotary_dim]
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(
        self, x: Float[Tensor, "batch pos head_index d_head"], past: int = 0
    ) -> Float[Tensor, "batch pos head_index d_head"]:
        """Rotate ``x`` as positions ``past, past + 1, ...`` (past: tokens already in a KV cache)."""
        if self.cos.device != x.device:
            self.cos, self.sin = self.cos.to(x.device), self.sin.to(x.device)
        positions = slice(past, past + x.shape[1])
        cos = self.cos[positions, None].to(x.dtype)  # [pos 1 rotary_dim], broadcast over heads
        sin = self.sin[positions, None].to(x.dtype)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        first, second = rot.chunk(2, dim=-1)
        rotated = rot * cos + torch.cat([-second, first], dim=-1) * sin
        return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


def unchanged_qk(q, k, past: int) -> QK:
    return q, k


class _NormQK:
    def __init__(self, q_norm: RMSNorm, k_norm: RMSNorm):
        self.q_norm, self.k_norm = q_norm, k_norm

    def __call__(self, q, k, past: int) -> QK:
        return self.q_norm(q), self.k_norm(k)


class _RotateQK:
    def __init__(self, rotary: RotaryEmbedding, hook_rot_q: HookPoint, hook_rot_k: HookPoint):
        self.rotary, self.hook_rot_q, self.hook_rot_k = rotary, hook_rot_q, hook_rot_k

    def __call__(self, q, k, past: int) -> QK:
        return self.hook_rot_q(self.rotary(q, past)), self.hook_rot_k(self.rotary(k, past))


class _Chain:
    def __init__(self, steps: list):
        self.steps = steps

    def __call__(self, q, k, past: int) -> QK:
        for step in self.steps:
            q, k = step(q, k, past)
        return q, k


def qk_transform(attn: nn.Module, cfg: GPT2Config) -> Callable[[Tensor, Tensor, int], QK]:
    """Give ``attn`` the modules and hooks that act on queries and keys between
    ``hook_q`` / ``hook_k`` and the dot product, and return the function that applies
    them, ``(q, k, past) -> (q, k)``: QK-norm, then rotary positions, as configured.

    They are registered on ``attn`` itself, so their hooks keep TransformerLens's names
    (``blocks.0.attn.hook_rot_q``, ``blocks.0.attn.q_norm.hook_scale``); the function
    returned is a plain object, so GPT-2 (neither) pays one Python call for it.
    """
    steps = []
    if cfg.qk_norm:
        attn.q_norm, attn.k_norm = RMSNorm(cfg, cfg.d_head), RMSNorm(cfg, cfg.d_head)
        steps.append(_NormQK(attn.q_norm, attn.k_norm))
    if cfg.positional == "rotary":
        attn.rotary = RotaryEmbedding(cfg)
        attn.hook_rot_q, attn.hook_rot_k = HookPoint(), HookPoint()  # [batch pos head_index d_head]
        steps.append(_RotateQK(attn.rotary, attn.hook_rot_q, attn.hook_rot_k))
    if not steps:
        return unchanged_qk
    return steps[0] if len(steps) == 1 else _Chain(steps)


class SwiGLU(nn.Module):
    """The gated MLP of Llama and PaLM: ``(silu(x W_gate) * (x W_in)) W_out``, with
    ``d_mlp`` the hidden width (three matrices, so about 8/3 d_model matches GPT-2's
    parameter count at 4 d_model)."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.fc_gate = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.fc_out = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.hook_pre = HookPoint()  # [batch pos d_mlp], the gate before silu
        self.hook_pre_linear = HookPoint()  # [batch pos d_mlp]
        self.hook_post = HookPoint()  # [batch pos d_mlp]

    W_gate = property(lambda self: self.fc_gate.weight.T)  # [d_model d_mlp]
    W_in = property(lambda self: self.fc_in.weight.T)  # [d_model d_mlp]
    W_out = property(lambda self: self.fc_out.weight.T)  # [d_mlp d_model]
    b_gate = property(lambda self: bias_or_zeros(self.fc_gate))
    b_in = property(lambda self: bias_or_zeros(self.fc_in))
    b_out = property(lambda self: bias_or_zeros(self.fc_out))

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        gate = self.hook_pre(self.fc_gate(x))
        linear = self.hook_pre_linear(self.fc_in(x))
        post = self.hook_post(F.silu(gate) * linear)
        return self.dropout(self.fc_out(post))
