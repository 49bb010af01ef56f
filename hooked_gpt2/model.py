"""HookedGPT2: GPT-2 with a hook point on every activation worth reading.

Read top to bottom in the order the forward pass runs: layer norm, attention, MLP,
block, model. With no hook attached the model runs the fast path (fused QKV projection,
``F.layer_norm``, ``F.scaled_dot_product_attention``); hooks on the attention internals or
the layer-norm scale switch those modules to an explicit path computing the same function.
Architecture variants (RMSNorm, rotary positions, QK-norm, SwiGLU; ``components.py``)
are chosen once, when a block is built, from the config.
"""

import math
from pathlib import Path

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from . import checkpoint, hf_interop
from .cache import ActivationCache
from .components import RMSNorm, SwiGLU, bias_or_zeros, qk_transform
from .config import GPT2Config
from .generation import generate_tokens
from .hook_points import HookedRootModule, HookPoint
from .losses import next_token_loss
from .tokenizer import EOT_TOKEN, get_tokenizer


class LayerNorm(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.eps = cfg.layer_norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_scale = HookPoint()  # [batch pos 1]
        self.hook_normalized = HookPoint()  # [batch pos d_model], after weight and bias

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if not (self.hook_scale.has_hooks() or self.hook_normalized.has_hooks()):
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale * self.weight + self.bias)


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

    def forward(self, x: Float[Tensor, "batch pos d_model"], kv_cache=None, layer: int = 0):
        q, k, v = einops.rearrange(
            self.qkv(x),
            "batch pos (three head d_head) -> three batch pos head d_head",
            three=3,
            head=self.n_heads,
        )
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
        if self.hook_result.has_hooks():
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
        self.layer = layer
        self.attn_only = cfg.attn_only
        # Attributes in forward order, so hook_names() lists hooks in the order they fire.
        self.hook_resid_pre = HookPoint()  # [batch pos d_model]
        self.ln1 = NORMS[cfg.norm](cfg)
        self.attn = Attention(cfg)
        self.hook_attn_out = HookPoint()
        if not cfg.attn_only:
            self.hook_resid_mid = HookPoint()
            self.ln2 = NORMS[cfg.norm](cfg)
            self.mlp = MLPS[cfg.mlp](cfg)
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, resid_pre: Float[Tensor, "batch pos d_model"], kv_cache=None):
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), kv_cache, self.layer))
        if self.attn_only:
            return self.hook_resid_post(resid_pre + attn_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)


class HookedGPT2(HookedRootModule):
    """GPT-2 for training and for taking apart.

    >>> model = HookedGPT2(GPT2Config.preset("tiny"))
    >>> logits, cache = model.run_with_cache(model.to_tokens("Hello world"))
    >>> cache["pattern", 0].shape  # [batch head_index query_pos key_pos]
    torch.Size([1, 4, 3, 3])
    """

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()  # [batch pos d_model]
        # Rotary positions act inside attention instead (components.RotaryEmbedding).
        self.learned_positions = cfg.positional == "learned"
        if self.learned_positions:
            self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
            self.hook_pos_embed = HookPoint()
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = NORMS[cfg.norm](cfg)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.init_weights()
        self.setup_hooks()

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

    def forward(self, tokens: Int[Tensor, "batch pos"], kv_cache=None) -> Float[Tensor, "batch pos d_vocab"]:
        return self.unembed(self.final_residual(tokens, kv_cache))

    def final_residual(self, tokens: Int[Tensor, "batch pos"], kv_cache=None) -> Float[Tensor, "batch pos d_model"]:
        """Everything but the unembedding: the output of ``ln_final``. Generation uses it to
        unembed only the last position."""
        past = kv_cache.length if kv_cache is not None else 0
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
        for block in self.blocks:
            resid = block(resid, kv_cache)
        if kv_cache is not None:
            kv_cache.length += tokens.shape[1]
        return self.ln_final(resid)

    def loss(self, tokens: Int[Tensor, "batch pos"], per_token: bool = False):
        """Next-token cross-entropy: predicts ``tokens[:, 1:]`` from ``tokens[:, :-1]``.

        Returns the mean over all predictions, or ``[batch pos-1]`` with ``per_token``.
        """
        tokens = self.check_tokens(tokens, past=-1)  # the last token is only a target: n_ctx + 1 fit
        if tokens.shape[1] < 2:
            raise ValueError("loss needs at least 2 tokens per sequence (an input and a target)")
        return next_token_loss(self(tokens[:, :-1]), tokens, per_token)

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

    def n_params(self, embeddings: bool = True) -> int:
        return self.cfg.n_params(embeddings)

    # Tokenizer helpers (GPT-2's BPE, offline; <|endoftext|> doubles as BOS and padding).
    @property
    def tokenizer(self):
        return get_tokenizer()

    def to_tokens(self, text: str | list[str], prepend_bos: bool = True) -> Int[Tensor, "batch pos"]:
        """Text to token ids on the model's device; a list of strings is right-padded with
        <|endoftext|>.

        >>> model.to_tokens("Hello world", prepend_bos=False)
        tensor([[15496,   995]])
        """
        texts = [text] if isinstance(text, str) else list(text)
        ids = [([EOT_TOKEN] if prepend_bos else []) + self.tokenizer.encode_ordinary(t) for t in texts]
        if not any(ids):
            raise ValueError("the text is empty: give a non-empty prompt (or prepend_bos=True)")
        width = max(len(row) for row in ids)
        padded = [row + [EOT_TOKEN] * (width - len(row)) for row in ids]
        return torch.tensor(padded, dtype=torch.long, device=self.W_E.device)

    def to_str_tokens(self, text_or_tokens, prepend_bos: bool = True) -> list[str]:
        """Each token as its own string, for labelling plots."""
        if isinstance(text_or_tokens, str):
            tokens = self.to_tokens(text_or_tokens, prepend_bos=prepend_bos)[0]
        else:
            tokens = torch.as_tensor(text_or_tokens)
            if tokens.dim() == 2:
                if tokens.shape[0] != 1:
                    raise ValueError("to_str_tokens takes one sequence; index the batch first")
                tokens = tokens[0]
        return [self.tokenizer.decode([int(t)]) for t in tokens]

    def to_string(self, tokens) -> str | list[str]:
        """Decode ids back to text; a [batch pos] tensor gives a list of strings."""
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 2:
            return [self.tokenizer.decode(row.tolist()) for row in tokens]
        return self.tokenizer.decode(tokens.tolist())

    # Checkpoints.
    def save_pretrained(self, path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``path`` (atomically)."""
        return checkpoint.save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> "HookedGPT2":
        """Load a ``save_pretrained`` directory (in eval mode). Never unpickles."""
        return checkpoint.from_pretrained(cls, path, device=device, dtype=dtype)

    # Caching.
    def run_with_cache(
        self,
        tokens,
        names_filter=None,
        device=None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        metric=None,
    ) -> tuple[Tensor, ActivationCache]:
        """Run the model and keep the activations that ``names_filter`` selects (all by
        default: a name, a list of names, or a function of the name).

        Without ``incl_bwd`` the run is under ``torch.no_grad()``, so memory goes only to
        what is cached. With it, gradients are stored as ``name + "_grad"``: of
        ``metric(logits)`` if given, else of the mean next-token loss (``.grad`` of the
        parameters accumulates as in any backward pass).

        >>> logits, cache = model.run_with_cache(tokens, names_filter=lambda n: "pattern" in n)
        """
        names = self.resolve_names(names_filter)
        tokens = self.check_tokens(tokens)
        if remove_batch_dim and tokens.shape[0] != 1:
            raise ValueError(f"remove_batch_dim needs a batch of 1, got {tokens.shape[0]}")
        store: dict[str, Tensor] = {}

        def keep(key: str, tensor: Tensor) -> None:
            tensor = tensor.detach()
            if remove_batch_dim:
                tensor = tensor[0]
            store[key] = tensor.to(device) if device is not None else tensor

        def save(activation, hook):
            keep(hook.name, activation)

        def save_grad(grad, hook):
            keep(hook.name + "_grad", grad)

        fwd_hooks = [(name, save) for name in names]
        bwd_hooks = [(name, save_grad) for name in names] if incl_bwd else []
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
            if incl_bwd:
                with torch.enable_grad():
                    logits = self(tokens)
                    value = metric(logits) if metric is not None else next_token_loss(logits, tokens)
                    if value.dim() != 0:
                        raise ValueError(f"metric must return a scalar, got shape {tuple(value.shape)}")
                    value.backward()
                logits = logits.detach()
            else:
                with torch.no_grad():
                    logits = self(tokens)
        # Forward order of hook names, then their gradients (backward hooks fire in reverse).
        order = [*self.hook_dict, *(name + "_grad" for name in self.hook_dict)]
        ordered = {key: store[key] for key in order if key in store}
        cache = ActivationCache(ordered, self, has_batch_dim=not remove_batch_dim)
        return (logits[0] if remove_batch_dim else logits), cache

    # Generation.
    def generate(
        self,
        prompt_or_tokens,
        max_new_tokens: int = 20,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eos: bool = False,
        use_kv_cache: bool = True,
    ):
        """Continue a prompt. ``temperature=0`` is greedy; ``seed`` makes sampling repeatable.

        A string gives back a string (prompt and continuation); token ids ``[batch pos]``
        give back ``[batch pos + new]`` (fewer new if every row stopped at <|endoftext|>).

        >>> model.generate("The meaning of life is", max_new_tokens=5, temperature=0)  # doctest: +ELLIPSIS
        'The meaning of life is...'
        """
        if isinstance(prompt_or_tokens, str):
            if not prompt_or_tokens:
                raise ValueError("the prompt is empty: give some text to continue")
            tokens = self.to_tokens(prompt_or_tokens, prepend_bos=False)
        else:
            tokens = self.check_tokens(prompt_or_tokens)
        out = generate_tokens(
            self, tokens, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos, use_kv_cache
        )
        return self.to_string(out[0]) if isinstance(prompt_or_tokens, str) else out


    # Hugging Face interop.
    @classmethod
    def from_hf(cls, dir_or_model, device=None, dtype=None) -> "HookedGPT2":
        """Load a Hugging Face ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` (multi-head
        attention): a ``save_pretrained`` directory (e.g. OpenAI's GPT-2 weights already
        on disk) or a model object.

        >>> model = HookedGPT2.from_hf("path/to/gpt2")  # doctest: +SKIP
        """
        return hf_interop.from_hf(cls, dir_or_model, device=device, dtype=dtype)

    def save_hf(self, path, source=None) -> Path:
        """Write a directory that ``transformers.GPT2LMHeadModel.from_pretrained`` (or, for
        the Llama architecture, ``LlamaForCausalLM``) loads as an exactly equivalent model,
        with GPT-2's tokenizer files for ``pipeline`` and a README.md model card from the run
        beside checkpoint ``source`` (default: the directory this model was loaded from)."""
        return hf_interop.save_hf(self, path, source)

