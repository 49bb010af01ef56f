"""A hook-free GPT-2 for the benchmarks to measure HookedGPT2 against."""

import torch
import torch.nn.functional as F
from torch import nn

from hooked_gpt2 import GPT2Config


# The reference: GPT-2 as plainly as it can be written, with HookedGPT2's parameter names
# so the same state dict loads into both.
class RefBlock(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(cfg.d_model, 3 * cfg.n_heads * cfg.d_head, bias=cfg.qkv_bias)
        self.attn.out = nn.Linear(cfg.n_heads * cfg.d_head, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = nn.Module()
        self.mlp.fc_in = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.mlp.fc_out = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.attn.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + self.attn.out(z)
        return x + self.mlp.fc_out(F.gelu(self.mlp.fc_in(self.ln2(x)), approximate="tanh"))


class RefGPT2(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        assert not cfg.attn_only and cfg.dropout == 0 and cfg.tie_embeddings, "the reference covers the mini preset's shape"
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.blocks = nn.ModuleList(RefBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
        self.unembed.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos_embed(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_final(x))


def transformer_lens_copy(model):
    """TransformerLens 3.x's HookedTransformer with ``model``'s weights, converted by
    TransformerLens itself from the Hugging Face export (unprocessed, so equal logits)."""
    import tempfile
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        hf = GPT2LMHeadModel.from_pretrained(model.save_hf(tmp)).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head, d_mlp=4 * c.n_embd,
        n_ctx=c.n_positions, d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN",
        eps=c.layer_norm_epsilon, device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = HookedTransformer(cfg)
        tl.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False)
    return tl.eval()
