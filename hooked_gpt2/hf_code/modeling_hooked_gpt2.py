"""A hooked-gpt2 model for ``transformers``: ``AutoModelForCausalLM``, ``generate`` (with a
KV cache), ``pipeline("text-generation")`` and ``Trainer``.

The same function as hooked-gpt2's ``HookedGPT2`` (its logits within float rounding), with
the same parameter names, so an export's ``model.safetensors`` is that model's state dict.
Read top to bottom in the order the forward pass runs: norms, rotary positions,
attention, MLPs, block, model. The variants (``HookedGPT2Config``) are chosen once, when
a block is built. Self-contained: it imports ``torch``, ``transformers`` and the
configuration beside it, never ``hooked_gpt2``; for the same reason axes move with
``transpose`` and ``view``, not einops, which users of an export may not have.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_hooked_gpt2 import HookedGPT2Config

# transformers renamed the output's past_key_values to cache (5.x); write whichever it has.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class LayerNorm(nn.Module):
    def __init__(self, length: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(length))
        self.bias = nn.Parameter(torch.zeros(length))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, in the weight's precision."""

    def __init__(self, length: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(length))

    def forward(self, x):
        return F.rms_norm(x.to(self.weight.dtype), x.shape[-1:], self.weight, self.eps).to(x.dtype)


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


def rotary_angles(config: HookedGPT2Config, position_ids, device):
    """cos and sin ``[batch pos 1 rotary_dim]`` of each position's rotation (float32, as
    hooked-gpt2 computes them), or None without rotary positions."""
    if config.positional != "rotary":
        return None
    dim = config.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = (1.0 / (config.rotary_base**exponents)).to(device)
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    return angles.cos(), angles.sin()


def rotate(x, angles):
    """Rotate the first rotary_dim dimensions of each head of ``x`` ``[batch pos head
    d_head]``; dimension i pairs with i + rotary_dim / 2 (GPT-NeoX's layout)."""
    cos, sin = angles
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    first, second = rot.chunk(2, dim=-1)
    rotated = rot * cos.to(x.dtype) + torch.cat([-second, first], dim=-1) * sin.to(x.dtype)
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


class Attention(nn.Module):
    def __init__(self, config: HookedGPT2Config, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.d_head = layer, config.n_heads, config.d_head
        # Q, K and V of all heads in one matrix, rows ordered (q|k|v, head, d_head).
        self.qkv = nn.Linear(config.d_model, 3 * config.n_heads * config.d_head, bias=config.qkv_bias)
        self.out = nn.Linear(config.n_heads * config.d_head, config.d_model, bias=config.attn_bias)
        self.out.residual_output = True  # initialised smaller (_init_weights)
        if config.qk_norm:  # RMSNorm of each head's queries and keys, before rotation
            self.q_norm = RMSNorm(config.d_head, config.layer_norm_eps)
            self.k_norm = RMSNorm(config.d_head, config.layer_norm_eps)
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, angles, mask, cache):
        batch, pos, _ = x.shape
        q, k, v = self.qkv(x).view(batch, pos, 3, self.n_heads, self.d_head).unbind(2)  # [batch pos head d_head]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if angles is not None:
            q, k = rotate(q, angles), rotate(k, angles)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch head pos d_head], as SDPA and the cache want
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        z = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.attn_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask.is_causal,
        )
        return self.resid_dropout(self.out(z.transpose(1, 2).reshape(batch, pos, -1)))


class MLP(nn.Module):
    def __init__(self, config: HookedGPT2Config):
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.d_mlp, bias=config.mlp_bias)
        self.fc_out = nn.Linear(config.d_mlp, config.d_model, bias=config.mlp_bias)
        self.fc_out.residual_output = True
        self.approximate = "tanh" if config.act_fn == "gelu_new" else "none"
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x), approximate=self.approximate)))


class SwiGLU(nn.Module):
    """(silu(x W_gate) * (x W_in)) W_out, d_mlp wide."""

    def __init__(self, config: HookedGPT2Config):
        super().__init__()
        self.fc_gate = nn.Linear(config.d_model, config.d_mlp, bias=config.mlp_bias)
        self.fc_in = nn.Linear(config.d_model, config.d_mlp, bias=config.mlp_bias)
        self.fc_out = nn.Linear(config.d_mlp, config.d_model, bias=config.mlp_bias)
        self.fc_out.residual_output = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.fc_out(F.silu(self.fc_gate(x)) * self.fc_in(x)))


MLPS = {"gelu": MLP, "swiglu": SwiGLU}


class Block(nn.Module):
    def __init__(self, config: HookedGPT2Config, layer: int):
        super().__init__()
        self.ln1 = NORMS[config.norm](config.d_model, config.layer_norm_eps)
        self.attn = Attention(config, layer)
        self.attn_only = config.attn_only
        if not config.attn_only:
            self.ln2 = NORMS[config.norm](config.d_model, config.layer_norm_eps)
            self.mlp = MLPS[config.mlp](config)

    def forward(self, resid, angles, mask, cache):
        resid = resid + self.attn(self.ln1(resid), angles, mask, cache)
        if self.attn_only:
            return resid
        return resid + self.mlp(self.ln2(resid))


class AttentionMask:
    """What SDPA needs: is_causal alone where no key is padding (hooked-gpt2's own
    calls), else a boolean mask ``[batch 1 query_pos key_pos]``."""

    def __init__(self, attention_mask, past: int, pos: int, device):
        self.attn_mask, self.is_causal = None, False
        padded = attention_mask is not None and not bool(attention_mask.all())
        if not padded:
            if past == 0 and pos > 1:
                self.is_causal = True
            elif pos > 1:  # queries after cached keys: each sees the keys up to its own position
                self.attn_mask = self._causal(past, pos, device)
            return
        keys = attention_mask[:, None, None, -(past + pos):].bool()
        causal = self._causal(past, pos, device)
        # A padding query sees itself, so that its (unused) row is not all masked, which gives NaN.
        itself = torch.arange(past, past + pos, device=device)[:, None] == torch.arange(past + pos, device=device)
        self.attn_mask = (causal & keys) | itself

    @staticmethod
    def _causal(past: int, pos: int, device):
        query_pos = torch.arange(past, past + pos, device=device)[:, None]
        return torch.arange(past + pos, device=device)[None, :] <= query_pos


class HookedGPT2PreTrainedModel(PreTrainedModel):
    config_class = HookedGPT2Config
    base_model_prefix = "hooked_gpt2"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        """GPT-2's initialisation, as hooked-gpt2's: N(0, init_std), the residual output
        projections scaled down by 1/sqrt(2 n_layers), zero biases, unit norms."""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            residual = getattr(module, "residual_output", False)
            module.weight.normal_(0.0, std / math.sqrt(2 * self.config.n_layers) if residual else std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, (LayerNorm, RMSNorm)):
            module.weight.fill_(1.0)
            if isinstance(module, LayerNorm):
                module.bias.zero_()


class HookedGPT2ForCausalLM(HookedGPT2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"unembed.weight": "embed.weight"}

    def __init__(self, config: HookedGPT2Config):
        super().__init__(config)
        self.embed = nn.Embedding(config.d_vocab, config.d_model)
        if config.positional == "learned":
            self.pos_embed = nn.Embedding(config.n_ctx, config.d_model)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.ln_final = NORMS[config.norm](config.d_model, config.layer_norm_eps)
        self.unembed = nn.Linear(config.d_model, config.d_vocab, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.unembed

    def set_output_embeddings(self, value):
        self.unembed = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs):
        """Logits ``[batch pos vocab_size]`` of ``input_ids`` (after the ``cache``'s tokens),
        and the next-token loss against ``labels`` where given (``-100``: not counted)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        resid = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        batch, pos = resid.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + pos, device=resid.device)[None].expand(batch, pos)
        if self.config.positional == "learned":
            resid = resid + self.pos_embed(position_ids)
        resid = self.embed_dropout(resid)
        angles = rotary_angles(self.config, position_ids, resid.device)
        mask = AttentionMask(attention_mask, past, pos, resid.device)
        for block in self.blocks:
            resid = block(resid, angles, mask, cache)
        resid = self.ln_final(resid)
        if isinstance(logits_to_keep, int):  # generate asks for the last position's only
            resid = resid[:, -logits_to_keep:] if logits_to_keep else resid
        else:
            resid = resid[:, logits_to_keep]
        logits = self.unembed(resid)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.d_vocab, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
