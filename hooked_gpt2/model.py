"""HookedGPT2: GPT-2 with a hook point on every activation worth reading.

Read top to bottom in the order the forward pass runs: layer norm, attention, MLP,
block, model. With no hook attached the model runs the fast path (fused QKV projection,
``F.layer_norm``, ``F.scaled_dot_product_attention``); hooks on the attention internals or
the layer-norm scale switch those modules to an explicit path computing the same function.
Architecture variants (RMSNorm, rotary positions, QK-norm, SwiGLU; ``components.py``)
are chosen once, when a block is built, from the config.
"""

import copy
import math
from pathlib import Path
from typing import NamedTuple

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from . import checkpoint, hf_interop
from .caching import CachingMixin
from .components import RMSNorm, SwiGLU, bias_or_zeros, qk_transform
from .config import GPT2Config
from .factored_matrix import FactoredMatrix, composition_scores
from .generation import generate_tokens
from .hook_points import HookedRootModule, HookPoint
from .losses import next_token_loss
from .saes import SAEMixin
from .text import TextMixin


class LayerNorm(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.eps = cfg.layer_norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_scale = HookPoint()  # [batch pos 1]
        # [batch pos d_model], centred and scaled, *before* weight and bias: where
        # TransformerLens (>= 3.0) puts it, so that it equals LNPre's output.
        self.hook_normalized = HookPoint()

    w = property(lambda self: self.weight)  # TransformerLens's names
    b = property(lambda self: self.bias)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if not (self.hook_scale.has_hooks() or self.hook_normalized.has_hooks()):
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return normalize(x, self.eps, self.hook_scale, self.hook_normalized) * self.weight + self.bias


class LNPre(nn.Module):
    """A layer norm whose weight and bias were folded into the weights that read it
    (``processing.fold_ln``): centre and scale only, TransformerLens's ``LayerNormPre``."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.eps = cfg.layer_norm_eps
        self.hook_scale = HookPoint()  # [batch pos 1]
        self.hook_normalized = HookPoint()  # [batch pos d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if not (self.hook_scale.has_hooks() or self.hook_normalized.has_hooks()):
            return F.layer_norm(x, x.shape[-1:], None, None, self.eps)
        return normalize(x, self.eps, self.hook_scale, self.hook_normalized)


def normalize(x: Tensor, eps: float, hook_scale: HookPoint, hook_normalized: HookPoint) -> Tensor:
    """Centre, then divide by the root mean square: the explicit path, with both hooks."""
    x = x - x.mean(-1, keepdim=True)
    scale = hook_scale((x.pow(2).mean(-1, keepdim=True) + eps).sqrt())
    return hook_normalized(x / scale)


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        # Q, K and V for all heads in one matrix: one matmul in training. Rows are ordered
        # (q|k|v, head, d_head), as in Hugging Face's c_attn; W_Q etc. are views into it.
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.n_heads * cfg.d_head, bias=cfg.qkv_bias)
        self.out = nn.Linear(cfg.n_heads * cfg.d_head, cfg.d_model, bias=cfg.attn_bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.hook_q = HookPoint()  # [batch pos head_index d_head]
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        # QK-norm and rotary positions, where configured, act on q and k here (components.py).
        self.transform_qk = qk_transform(self, cfg)
        self.hook_attn_scores = HookPoint()  # [batch head_index query_pos key_pos]
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()  # [batch pos head_index d_head]
        self.hook_result = HookPoint()  # [batch pos head_index d_model]
        self.cfg = cfg  # the model's: its use_attn_result switch is read at each call

    # Per-head views of the fused weights, without copies.
    def _qkv_weight(self, i: int) -> Float[Tensor, "head_index d_model d_head"]:
        w = self.qkv.weight.view(3, self.n_heads, self.d_head, -1)[i]
        return einops.rearrange(w, "head d_head d_model -> head d_model d_head")

    def _qkv_bias(self, i: int) -> Float[Tensor, "head_index d_head"]:
        if self.qkv.bias is None:
            return self.qkv.weight.new_zeros(self.n_heads, self.d_head)
        return self.qkv.bias.view(3, self.n_heads, self.d_head)[i]

    W_Q = property(lambda self: self._qkv_weight(0))
    W_K = property(lambda self: self._qkv_weight(1))
    W_V = property(lambda self: self._qkv_weight(2))
    b_Q = property(lambda self: self._qkv_bias(0))
    b_K = property(lambda self: self._qkv_bias(1))
    b_V = property(lambda self: self._qkv_bias(2))

    @property
    def W_O(self) -> Float[Tensor, "head_index d_head d_model"]:
        w = self.out.weight.view(-1, self.n_heads, self.d_head)
        return einops.rearrange(w, "d_model head d_head -> head d_head d_model")

    @property
    def b_O(self) -> Float[Tensor, "d_model"]:
        return bias_or_zeros(self.out)

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q W_K^T`` of each head, ``[head_index d_model d_model]``, kept factored."""
        return FactoredMatrix(self.W_Q, einops.rearrange(self.W_K, "head d_model d_head -> head d_head d_model"))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V W_O`` of each head, ``[head_index d_model d_model]``, kept factored."""
        return FactoredMatrix(self.W_V, self.W_O)

    def forward(self, x: Float[Tensor, "batch pos d_model"], kv_cache=None, layer: int = 0):
        q, k, v = einops.rearrange(
            self.qkv(x),
            "batch pos (three head d_head) -> three batch pos head d_head",
            three=3,
            head=self.n_heads,
        )
        return self.attend(q, k, v, kv_cache, layer)

    def forward_per_head(
        self, q_in: Float[Tensor, "batch pos head_index d_model"], k_in, v_in, kv_cache=None, layer: int = 0
    ):
        """Attention where each head reads its own copy of the (normalised) stream, as
        TransformerLens's ``use_split_qkv_input`` / ``use_attn_in`` do (for path patching)."""
        q, k, v = (
            einops.einsum(x, W, "batch pos head d_model, head d_model d_head -> batch pos head d_head") + b
            for x, W, b in ((q_in, self.W_Q, self.b_Q), (k_in, self.W_K, self.b_K), (v_in, self.W_V, self.b_V))
        )
        return self.attend(q, k, v, kv_cache, layer)

    def attend(self, q, k, v, kv_cache, layer: int):
        past = kv_cache.length if kv_cache is not None else 0
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q, k = self.transform_qk(q, k, past)
        # SDPA and the KV cache both want [batch head pos d_head].
        q, k, v = (einops.rearrange(t, "batch pos head d_head -> batch head pos d_head") for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks():
            z = self._explicit_attention(q, k, v, past, dropout)
        else:
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=_causal_mask(q, k, past), dropout_p=dropout,
                is_causal=past == 0 and q.shape[2] > 1,
            )
        z = self.hook_z(einops.rearrange(z, "batch head pos d_head -> batch pos head d_head"))
        # Per-head results cost n_heads residual-width tensors: only when asked for, by
        # set_use_attn_result (as in TransformerLens) or by a hook attached to them.
        if self.cfg.use_attn_result or self.hook_result.has_hooks():
            result = self.hook_result(
                einops.einsum(
                    z, self.W_O, "batch pos head d_head, head d_head d_model -> batch pos head d_model"
                )
            )
            out = result.sum(-2) + self.b_O
        else:
            out = self.out(einops.rearrange(z, "batch pos head d_head -> batch pos (head d_head)"))
        return self.resid_dropout(out)

    def _explicit_attention(self, q, k, v, past: int, dropout: float):
        scores = einops.einsum(
            q, k, "batch head query_pos d_head, batch head key_pos d_head -> batch head query_pos key_pos"
        ) / math.sqrt(self.d_head)
        query_pos = torch.arange(past, past + q.shape[2], device=q.device)[:, None]
        key_pos = torch.arange(k.shape[2], device=q.device)[None, :]
        scores = self.hook_attn_scores(scores.masked_fill(key_pos > query_pos, float("-inf")))
        pattern = self.hook_pattern(scores.softmax(-1))
        pattern = F.dropout(pattern, dropout, training=dropout > 0)
        return einops.einsum(
            pattern, v, "batch head query_pos key_pos, batch head key_pos d_head -> batch head query_pos d_head"
        )


def _causal_mask(q: Tensor, k: Tensor, past: int) -> Tensor | None:
    """The boolean mask SDPA needs when queries start after cached keys (None otherwise)."""
    if past == 0 or q.shape[2] == 1:
        return None  # no past: is_causal; one new query: it may see every cached key
    query_pos = torch.arange(past, past + q.shape[2], device=q.device)[:, None]
    return torch.arange(k.shape[2], device=q.device)[None, :] <= query_pos


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.fc_out = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.approximate = "tanh" if cfg.act_fn == "gelu_new" else "none"
        self.dropout = nn.Dropout(cfg.dropout)
        self.hook_pre = HookPoint()  # [batch pos d_mlp]
        self.hook_post = HookPoint()

    W_in = property(lambda self: self.fc_in.weight.T)  # [d_model d_mlp]
    b_in = property(lambda self: bias_or_zeros(self.fc_in))
    W_out = property(lambda self: self.fc_out.weight.T)  # [d_mlp d_model]
    b_out = property(lambda self: bias_or_zeros(self.fc_out))

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(self.fc_in(x))
        post = self.hook_post(F.gelu(pre, approximate=self.approximate))
        return self.dropout(self.fc_out(post))


# The components each architecture choice selects (GPT2Config.norm, GPT2Config.mlp).
NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}
MLPS = {"gelu": MLP, "swiglu": SwiGLU}


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.attn_only = cfg.attn_only
        # Attributes in forward order, so hook_names() lists hooks in the order they fire.
        self.hook_resid_pre = HookPoint()  # [batch pos d_model]
        # Per-head copies of the stream, [batch pos head_index d_model]: these fire only
        # with cfg.use_attn_in / cfg.use_split_qkv_input on (set_use_attn_in, ...).
        self.hook_attn_in = HookPoint()
        self.hook_q_input = HookPoint()
        self.hook_k_input = HookPoint()
        self.hook_v_input = HookPoint()
        self.ln1 = NORMS[cfg.norm](cfg)
        self.attn = Attention(cfg)
        self.hook_attn_out = HookPoint()
        if not cfg.attn_only:
            self.hook_resid_mid = HookPoint()
            self.hook_mlp_in = HookPoint()  # fires only with cfg.use_hook_mlp_in
            self.ln2 = NORMS[cfg.norm](cfg)
            self.mlp = MLPS[cfg.mlp](cfg)
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, resid_pre: Float[Tensor, "batch pos d_model"], kv_cache=None):
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attention(resid_pre, kv_cache))
        if self.attn_only:
            return self.hook_resid_post(resid_pre + attn_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_in = self.hook_mlp_in(resid_mid.clone()) if self.cfg.use_hook_mlp_in else resid_mid
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mlp_in)))
        return self.hook_resid_post(resid_mid + mlp_out)

    def attention(self, resid_pre: Float[Tensor, "batch pos d_model"], kv_cache=None):
        if not (self.cfg.use_attn_in or self.cfg.use_split_qkv_input):
            return self.attn(self.ln1(resid_pre), kv_cache, self.layer)
        per_head = einops.repeat(resid_pre, "batch pos d_model -> batch pos head d_model", head=self.cfg.n_heads)
        if self.cfg.use_attn_in:
            q_in = k_in = v_in = self.hook_attn_in(per_head.clone())
        else:
            q_in, k_in, v_in = (
                hook(per_head.clone()) for hook in (self.hook_q_input, self.hook_k_input, self.hook_v_input)
            )
        # As in TransformerLens, ln1 runs once per input, so its cached scale is v's.
        return self.attn.forward_per_head(self.ln1(q_in), self.ln1(k_in), self.ln1(v_in), kv_cache, self.layer)


class Embed(nn.Embedding):
    W_E = property(lambda self: self.weight)  # [d_vocab d_model]


class PosEmbed(nn.Embedding):
    W_pos = property(lambda self: self.weight)  # [n_ctx d_model]


class Unembed(nn.Linear):
    """The unembedding; it has a bias ``b_U`` only once weight processing gave it one."""

    def __init__(self, d_model: int, d_vocab: int, bias: bool = False):
        super().__init__(d_model, d_vocab, bias=bias)
        self.hook_in = HookPoint()  # [batch pos d_model], as TransformerLens 3.x names them
        self.hook_out = HookPoint()  # [batch pos d_vocab]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return self.hook_out(super().forward(self.hook_in(x)))

    W_U = property(lambda self: self.weight.T)  # [d_model d_vocab]

    @property
    def b_U(self) -> Float[Tensor, "d_vocab"]:
        return self.bias if self.bias is not None else self.weight.new_zeros(self.weight.shape[0])


class HookedGPT2(TextMixin, CachingMixin, SAEMixin, HookedRootModule):
    """GPT-2 for training and for taking apart.

    >>> model = HookedGPT2(GPT2Config.preset("tiny"))
    >>> logits, cache = model.run_with_cache(model.to_tokens("Hello world"))
    >>> cache["pattern", 0].shape  # [batch head_index query_pos key_pos]
    torch.Size([1, 4, 3, 3])
    """

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        # A copy: run-time switches (set_use_attn_result, weight processing) are this model's.
        self.cfg = cfg = copy.copy(cfg)
        self.embed = Embed(cfg.d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()  # [batch pos d_model]
        # Rotary positions act inside attention instead (components.RotaryEmbedding).
        self.learned_positions = cfg.positional == "learned"
        if self.learned_positions:
            self.pos_embed = PosEmbed(cfg.n_ctx, cfg.d_model)
            self.hook_pos_embed = HookPoint()
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = NORMS[cfg.norm](cfg)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.init_weights()
        self.setup_hooks()
        self._sync_cfg()

    def to(self, *args, print_details: bool = False, **kwargs) -> "HookedGPT2":
        """``nn.Module.to``. ``print_details`` is TransformerLens's keyword (it printed the
        device moved to; here nothing is printed), taken because libraries call it on
        TransformerLens-like models: devinterp's ``sample`` calls
        ``model.to(device, print_details=False)``."""
        return super().to(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)  # .to(), .cuda(), .float(), ...
        self._sync_cfg()
        return module

    def _sync_cfg(self) -> None:
        """``cfg.device`` / ``cfg.dtype`` follow the parameters, as TransformerLens code expects."""
        self.cfg.device, self.cfg.dtype = self.W_E.device, self.W_E.dtype

    def init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), residual output projections scaled down by
        1/sqrt(2 n_layers) so the residual stream's variance does not grow with depth."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            projections = [block.attn.out] + ([] if self.cfg.attn_only else [block.mlp.fc_out])
            for linear in projections:
                nn.init.normal_(linear.weight, 0.0, std / math.sqrt(2 * self.cfg.n_layers))

    def forward(
        self,
        input,
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        stop_at_layer: int | None = None,
        *,
        kv_cache=None,
    ):
        """Logits ``[batch pos d_vocab]`` for token ids (or text, tokenised by ``to_tokens``).

        TransformerLens's signature: ``return_type`` is "logits", "loss" (mean next-token
        loss, or ``[batch pos-1]`` with ``loss_per_token``), "both" (``(logits, loss)``) or
        None; ``stop_at_layer=L`` returns the residual stream entering block L instead.
        """
        if return_type == "logits" and stop_at_layer is None and isinstance(input, Tensor):
            return self.unembed(self.final_residual(input, kv_cache))  # the fast path
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        tokens = self.input_tokens(input, prepend_bos, padding_side)
        if stop_at_layer is not None:
            return self.residual_stream(tokens, kv_cache, stop_at_layer)
        resid = self.final_residual(tokens, kv_cache)
        if return_type is None:
            return None
        logits = self.unembed(resid)
        if return_type == "logits":
            return logits
        loss = self.loss_fn(logits, tokens, per_token=loss_per_token)
        return loss if return_type == "loss" else Output(logits, loss)

    def input_tokens(self, input, prepend_bos: bool | None = None, padding_side: str | None = None) -> Tensor:
        """Text (a string or a list of strings) through ``to_tokens``; ids through ``check_tokens``."""
        if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
            return self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        return self.check_tokens(input)

    def final_residual(self, tokens: Int[Tensor, "batch pos"], kv_cache=None) -> Float[Tensor, "batch pos d_model"]:
        """Everything but the unembedding: the output of ``ln_final``. Generation uses it to
        unembed only the last position."""
        return self.ln_final(self.residual_stream(tokens, kv_cache))

    def residual_stream(
        self, tokens: Int[Tensor, "batch pos"], kv_cache=None, stop_at_layer: int | None = None
    ) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream after ``blocks[:stop_at_layer]`` (all blocks by default),
        before ``ln_final``."""
        past = kv_cache.length if kv_cache is not None else 0
        if kv_cache is not None and stop_at_layer is not None:
            raise ValueError("stop_at_layer cannot be combined with a KV cache (later layers would miss keys)")
        # Ids that generation sampled over d_vocab are in range by construction: not read back.
        tokens = self.check_tokens(tokens, past=past, values=not (kv_cache is not None and kv_cache.ids_in_range))
        resid = self.hook_embed(self.embed(tokens))
        if self.learned_positions:
            positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)
            pos_embed = self.pos_embed(positions).expand_as(resid)  # a view: no copy per batch row
            if self.hook_pos_embed.has_hooks():
                pos_embed = pos_embed.contiguous()  # so that hooks may edit it in place
            resid = resid + self.hook_pos_embed(pos_embed)
        resid = self.embed_dropout(resid)
        for block in self.blocks if stop_at_layer is None else self.blocks[:stop_at_layer]:
            resid = block(resid, kv_cache)
        if kv_cache is not None:
            kv_cache.length += tokens.shape[1]
        return resid

    def loss(self, tokens: Int[Tensor, "batch pos"], per_token: bool = False):
        """Next-token cross-entropy: predicts ``tokens[:, 1:]`` from ``tokens[:, :-1]``.

        Returns the mean over all predictions, or ``[batch pos-1]`` with ``per_token``.
        """
        tokens = self.check_tokens(tokens, past=-1)  # the last token is only a target: n_ctx + 1 fit
        if tokens.shape[1] < 2:
            raise ValueError("loss needs at least 2 tokens per sequence (an input and a target)")
        return self.loss_fn(self(tokens[:, :-1]), tokens, per_token=per_token)

    def loss_fn(self, logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"], attention_mask=None,
                per_token: bool = False):
        """Next-token loss of ``logits`` (for ``tokens``, or for all but its last) against
        ``tokens[:, 1:]``: TransformerLens's ``loss_fn``."""
        if attention_mask is not None:
            raise ValueError("loss_fn does not take an attention_mask here: batches are right-padded, "
                             "so slice off the padding (or use per_token=True and mask the result)")
        return next_token_loss(logits, tokens, per_token)

    def check_tokens(self, tokens, past: int = 0, values: bool = True) -> Int[Tensor, "batch pos"]:
        """Token ids as a 2-D long tensor, checked for length and (``values``) range."""
        if not isinstance(tokens, Tensor):
            tokens = torch.as_tensor(tokens)
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"tokens must be integer ids of shape [batch pos], got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.numel() == 0:  # no positions, or no sequences (min() below would fail)
            raise ValueError("tokens is empty: give at least one token per sequence")
        if past + tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(
                f"sequence of {past + tokens.shape[1]} tokens is longer than the model's context "
                f"n_ctx={self.cfg.n_ctx}; truncate it to the last {self.cfg.n_ctx} tokens"
            )
        # Checking values syncs a GPU, so the training hot path on CUDA skips it (an
        # out-of-range id there still fails, in the embedding's device assert).
        if values and not (tokens.is_cuda and self.training) and not torch.compiler.is_compiling():
            low, high = torch.stack(torch.aminmax(tokens)).tolist()  # one read from the device, not two
            if low < 0 or high >= self.cfg.d_vocab:
                bad = low if low < 0 else high
                raise ValueError(f"token id {bad} is out of range: ids must be in [0, {self.cfg.d_vocab})")
        return tokens.long().to(self.W_E.device)

    # Weights with TransformerLens's names and axes (views, except the stacks below).
    W_E = property(lambda self: self.embed.weight)  # [d_vocab d_model]
    W_pos = property(lambda self: self.pos_embed.weight)  # [n_ctx d_model]
    W_U = property(lambda self: self.unembed.weight.T)  # [d_model d_vocab]
    b_U = property(lambda self: self.unembed.b_U)  # [d_vocab]; zeros until processing adds one

    @property
    def W_E_pos(self) -> Float[Tensor, "d_vocab_plus_n_ctx d_model"]:
        """``W_E`` and ``W_pos`` stacked, ``[d_vocab + n_ctx, d_model]``: a basis of every
        input direction (for full QK and OV circuits). A rotary model has no ``W_pos``."""
        if not self.learned_positions:
            raise AttributeError("W_E_pos needs learned positions; this model's are rotary (no W_pos): use W_E")
        return torch.cat([self.W_E, self.W_pos], dim=0)

    def _stack(self, name: str, part: str = "attn") -> Tensor:
        return torch.stack([getattr(getattr(block, part), name) for block in self.blocks])

    # Stacks over layers, [n_layers ...]: copies, for whole-model einsums in notebooks.
    W_Q = property(lambda self: self._stack("W_Q"))
    W_K = property(lambda self: self._stack("W_K"))
    W_V = property(lambda self: self._stack("W_V"))
    W_O = property(lambda self: self._stack("W_O"))
    b_Q = property(lambda self: self._stack("b_Q"))
    b_K = property(lambda self: self._stack("b_K"))
    b_V = property(lambda self: self._stack("b_V"))
    b_O = property(lambda self: self._stack("b_O"))
    W_in = property(lambda self: self._stack("W_in", "mlp"))
    W_out = property(lambda self: self._stack("W_out", "mlp"))
    b_in = property(lambda self: self._stack("b_in", "mlp"))
    b_out = property(lambda self: self._stack("b_out", "mlp"))

    def qk_circuit(self, layer: int) -> Float[Tensor, "head_index d_model d_model"]:
        """W_Q W_K^T per head: how a query-side residual direction scores a key-side one."""
        attn = self.blocks[layer].attn
        return einops.einsum(attn.W_Q, attn.W_K, "head q d_head, head k d_head -> head q k")

    def ov_circuit(self, layer: int) -> Float[Tensor, "head_index d_model d_model"]:
        """W_V W_O per head: what a head writes to the residual stream for each direction it reads."""
        attn = self.blocks[layer].attn
        return einops.einsum(attn.W_V, attn.W_O, "head src d_head, head d_head dst -> head src dst")

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q W_K^T`` of every head, ``[n_layers n_heads d_model d_model]``, kept factored."""
        return FactoredMatrix(self.W_Q, einops.rearrange(self.W_K, "layer head d_model d_head -> layer head d_head d_model"))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V W_O`` of every head, ``[n_layers n_heads d_model d_model]``, kept factored."""
        return FactoredMatrix(self.W_V, self.W_O)

    def all_composition_scores(self, mode: str) -> Float[Tensor, "n_layers n_heads n_layers n_heads"]:
        """Q-, K- or V-composition (``mode`` "Q", "K", "V") of every earlier head's OV
        circuit with every later head's QK (QK^T for "K") or OV circuit, as in A
        Mathematical Framework: ``|L R|_F / (|L|_F |R|_F)``, zero unless the second head's
        layer is after the first's (TransformerLens's ``all_composition_scores``).

        >>> scores = model.all_composition_scores("K")  # [0, 1, 1, 3]: how much L1H3's keys read L0H1's output
        >>> scores.shape
        torch.Size([2, 4, 2, 4])
        """
        rights = {"Q": lambda: self.QK, "K": lambda: self.QK.T, "V": lambda: self.OV}
        if mode not in rights:
            raise ValueError(f"mode must be 'Q', 'K' or 'V', got {mode!r}")
        scores = composition_scores(self.OV, rights[mode]())
        layers = torch.arange(self.cfg.n_layers, device=scores.device)
        later = (layers[:, None, None, None] < layers[None, None, :, None])
        return torch.where(later, scores, torch.zeros_like(scores))

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Tensor:
        """The sum of the output biases (b_O, and b_out unless ``include_mlp_biases`` is
        False) written before ``layer``'s attention (its MLP with ``mlp_input``): ``[d_model]``."""
        bias = self.W_E.new_zeros(self.cfg.d_model)
        for block in self.blocks[:layer]:
            bias = bias + block.attn.b_O
            if include_mlp_biases and not self.cfg.attn_only:
                bias = bias + block.mlp.b_out
        if mlp_input:
            if layer >= self.cfg.n_layers:
                raise ValueError(f"mlp_input needs a layer below n_layers={self.cfg.n_layers}, got {layer}")
            bias = bias + self.blocks[layer].attn.b_O
        return bias

    def n_params(self, embeddings: bool = True) -> int:
        return self.cfg.n_params(embeddings)

    # TransformerLens's switches for optional hooks (path patching needs them).
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute each head's write, ``blocks.L.attn.hook_result`` (caches then hold it)."""
        self.cfg.use_attn_result = use_attn_result

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give each head its own copy of the stream for Q, K and V (``hook_q_input``, ...)."""
        self.cfg.use_split_qkv_input = use_split_qkv_input

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Give each head its own copy of the stream it reads (``blocks.L.hook_attn_in``)."""
        self.cfg.use_attn_in = use_attn_in

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Fire ``blocks.L.hook_mlp_in`` on a copy of the MLP's input stream."""
        self.cfg.use_hook_mlp_in = use_hook_mlp_in

    def process_weights_(
        self, fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
        fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False,
    ) -> "HookedGPT2":
        """TransformerLens's weight processing, in place (see ``hooked_gpt2.processing``).
        Log-probs are unchanged; logits change by a per-position constant."""
        from . import processing  # it builds on this module's layer norms

        processing.process_weights_(
            self, fold_ln, center_writing_weights, center_unembed, fold_value_biases, refactor_factored_attn_matrices
        )
        return self

    # TransformerLens's processing steps, one at a time (hooked_gpt2.processing). Given a
    # state dict (this model's layout), each returns a processed copy, as TransformerLens
    # 3.x does; with none, it processes this model in place and returns it.
    def fold_layer_norm(self, state_dict: dict | None = None, fold_biases: bool = True, center_weights: bool = True):
        """Fold the layer norms' weights and biases into the weights that read them
        (centring those, with ``center_weights``); the norms become scale-only.

        >>> folded = model.fold_layer_norm(model.state_dict())  # a processed copy
        >>> "blocks.0.ln1.weight" in folded, "blocks.0.ln1.weight" in model.state_dict()
        (False, True)
        >>> model.fold_layer_norm().cfg.normalization_type  # this model, in place
        'LNPre'
        """
        return self._processing_step("fold_layer_norm", state_dict, fold_biases=fold_biases,
                                     center_weights=center_weights)

    def center_writing_weights(self, state_dict: dict | None = None):
        """Make everything that writes to the residual stream write mean-zero vectors."""
        return self._processing_step("center_writing_weights", state_dict)

    def center_unembed(self, state_dict: dict | None = None):
        """Give ``W_U`` and ``b_U`` zero mean over the vocabulary (log-probs unchanged)."""
        return self._processing_step("center_unembed", state_dict)

    def fold_value_biases(self, state_dict: dict | None = None):
        """Move the value biases ``b_V`` into the output bias ``b_O``."""
        return self._processing_step("fold_value_biases", state_dict)

    def refactor_factored_attn_matrices(self, state_dict: dict | None = None):
        """Refactor each head's Q/K and V/O factors (same QK and OV matrices)."""
        return self._processing_step("refactor_factored_attn_matrices", state_dict)

    def _processing_step(self, step: str, state_dict: dict | None, **options):
        from . import processing  # it builds on this module's layer norms

        return processing.apply_step(self, step, state_dict, **options)

    # Checkpoints.
    def save_pretrained(self, path, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``path`` (atomically). A
        directory that exists and is not empty is refused unless ``overwrite=True``."""
        self._check_unprocessed("save_pretrained")
        return checkpoint.save_pretrained(self, path, overwrite)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, process_weights: bool = False, **processing) -> "HookedGPT2":
        """Load a ``save_pretrained`` directory (in eval mode). Never unpickles.

        ``process_weights=True`` applies TransformerLens's ``from_pretrained`` processing
        (fold_ln, center_writing_weights, center_unembed, fold_value_biases; turn any off
        by name, e.g. ``center_unembed=False``)."""
        model = checkpoint.from_pretrained(cls, path, device=device, dtype=dtype)
        return model.process_weights_(**processing) if process_weights else model

    def _check_unprocessed(self, action: str) -> None:
        if self.cfg.normalization_type.endswith("Pre") or self.unembed.bias is not None:
            raise ValueError(
                f"{action} writes the unprocessed architecture, and this model's weights were processed "
                "(folded layer norms / an unembedding bias): save the model before process_weights_, "
                "and process again after loading (from_pretrained(..., process_weights=True))"
            )

    # Generation.
    def generate(
        self,
        input="",
        max_new_tokens: int = 20,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eos: bool = False,
        use_kv_cache: bool = True,
        *,
        do_sample: bool = True,
        eos_token_id: int | None = None,
        freq_penalty: float = 0.0,
        use_past_kv_cache: bool | None = None,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        return_type: str = "input",
        verbose: bool = False,
    ):
        """Continue a prompt. ``temperature=0`` (or ``do_sample=False``) is greedy; ``seed``
        makes sampling repeatable.

        A string gives back a string (prompt and continuation, special tokens dropped);
        token ids ``[batch pos]`` give back ``[batch pos + new]`` (fewer new if every row
        stopped at <|endoftext|>). As in TransformerLens, text gets a BOS unless
        ``prepend_bos=False``; ``return_type`` "str" or "tokens" overrides the kind returned.
        The rest of TransformerLens's keywords are taken (``eos_token_id``, ``freq_penalty``,
        ``use_past_kv_cache``, ``verbose``), but ``stop_at_eos`` stays off by default.

        >>> model.generate("The meaning of life is", max_new_tokens=5, temperature=0)  # doctest: +ELLIPSIS
        'The meaning of life is...'
        """
        if return_type not in ("input", "str", "tokens"):
            raise ValueError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
        is_text = isinstance(input, (str, list))
        if input == "":  # TransformerLens would sample from BOS alone; a CLI typo is likelier
            raise ValueError("the prompt is empty: give some text to continue")
        if isinstance(input, list) and len({len(self.to_tokens(text)[0]) for text in input}) > 1:
            # TransformerLens left-pads and masks; without masks, padding would be read as text.
            raise ValueError("prompts of different token lengths: generate them one at a time, or pass "
                             "token ids of equal length")
        if is_text:
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        else:
            tokens = self.check_tokens(input)
        use_kv_cache = use_kv_cache if use_past_kv_cache is None else use_past_kv_cache
        out = generate_tokens(
            self, tokens, max_new_tokens, temperature if do_sample else 0.0, top_k, top_p, seed, stop_at_eos,
            use_kv_cache, eos_token_id=self.tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
            freq_penalty=freq_penalty, verbose=verbose,
        )
        if return_type == "tokens" or (return_type == "input" and not is_text):
            return out
        texts = [self.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in out]
        return texts[0] if len(texts) == 1 else texts

    # Hugging Face interop.
    @classmethod
    def from_hf(cls, dir_or_model, device=None, dtype=None, process_weights: bool = False, **processing) -> "HookedGPT2":
        """Load a Hugging Face ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` (multi-head
        attention), or one of ``save_hf``'s custom-code exports: a ``save_pretrained``
        directory (e.g. OpenAI's GPT-2 weights already on disk) or a model object. Unprocessed (exactly Hugging Face's numbers) unless
        ``process_weights=True``, which gives TransformerLens's ``from_pretrained``
        defaults (see ``from_pretrained``).

        >>> model = HookedGPT2.from_hf("path/to/gpt2", process_weights=True)  # doctest: +SKIP
        """
        model = hf_interop.from_hf(cls, dir_or_model, device=device, dtype=dtype)
        return model.process_weights_(**processing) if process_weights else model

    def save_hf(self, path, source=None, overwrite: bool = False) -> Path:
        """Write a directory that ``transformers.GPT2LMHeadModel.from_pretrained`` (or, for
        the Llama architecture, ``LlamaForCausalLM``; for any other, ``AutoModelForCausalLM``
        with ``trust_remote_code=True``, from the modeling code written beside the weights)
        loads as an exactly equivalent model, with tokenizer files for ``pipeline`` (GPT-2's,
        or a compact vocabulary's own) and a README.md model card from the run beside
        checkpoint ``source`` (default: the directory this model was loaded from). See
        ``docs/hub.md`` for putting it on the Hub. A directory that exists and is not empty
        is refused unless ``overwrite=True``."""
        self._check_unprocessed("save_hf")
        return hf_interop.save_hf(self, path, source, overwrite=overwrite)


class Output(NamedTuple):
    """What ``return_type="both"`` returns, as in TransformerLens."""

    logits: Tensor
    loss: Tensor
