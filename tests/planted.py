"""A 2-layer attention-only model with a planted induction circuit, weights set by hand.

Residual stream subspaces (d_model = 320, every head 64 wide):

    [0, 64)    current token, one-hot            (embedding)
    [64, 128)  position, one-hot                 (positional embedding)
    [128, 192) previous token, one-hot           (written by L0H0)
    [192, 256) predicted next token, one-hot     (written by L1H0, read by the unembedding)
    256..258   balancing coordinates: each writer also writes -1 here, so every residual
               vector has mean zero and (given sharp attention) a constant norm, and the
               layer norms reduce to a known constant factor.

L0H0 is a previous-token head (query position p matches key position p-1) and copies the
attended token into the previous-token subspace. L1H0 matches its current token against
each key's previous token and copies the attended token to the output subspace: an
induction head. Every other head has zero weights (uniform attention, zero output).
``induction_scale`` multiplies L1H0's weights (0 gives an untrained-looking head).
"""

import math

import torch

from hooked_gpt2 import GPT2Config, HookedGPT2

D_VOCAB, N_CTX, D_HEAD = 64, 64, 64
TOKEN, POS, PREV, OUT = 0, 64, 128, 192
BAL_EMBED, BAL_PREV, BAL_OUT = 256, 257, 258
PREV_HEAD, INDUCTION_HEAD = (0, 0), (1, 0)


def planted_config() -> GPT2Config:
    return GPT2Config(n_layers=2, d_model=320, n_heads=5, d_vocab=D_VOCAB, n_ctx=N_CTX, attn_only=True,
                      tie_embeddings=False, qkv_bias=True)


def _head_weights(attn, head: int):
    """Writable per-head views of the fused weights: q, k, v as [d_head d_model], o as [d_model d_head]."""
    qkv = attn.qkv.weight.view(3, attn.n_heads, attn.d_head, -1)
    out = attn.out.weight.view(-1, attn.n_heads, attn.d_head)
    return qkv[0, head], qkv[1, head], qkv[2, head], out[:, head]


def build_planted_induction_model(induction_scale: float = 1.0) -> HookedGPT2:
    """The planted model, in eval mode. The BOS token is id 63 (``D_VOCAB - 1``).

    >>> model = build_planted_induction_model()
    >>> model.cfg.n_layers, model.cfg.attn_only
    (2, True)
    """
    model = HookedGPT2(planted_config()).eval()
    eye = torch.eye(D_HEAD)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for block in list(model.blocks) + [model]:
            for ln in ([block.ln1] if block is not model else [model.ln_final]):
                ln.weight.fill_(1.0)
        # Embeddings: one-hot token and position, each balanced to mean zero.
        model.embed.weight[:, TOKEN:TOKEN + D_VOCAB] = eye
        model.embed.weight[:, BAL_EMBED] = -1.0
        model.pos_embed.weight[:, POS:POS + N_CTX] = eye
        model.pos_embed.weight[:, BAL_EMBED] = -1.0
        # Layer 0's layer norm sees norm^2 = 1 + 1 + 4 per vector: it multiplies by c0.
        c0 = math.sqrt(320 / 6)
        q, k, v, o = _head_weights(model.blocks[0].attn, PREV_HEAD[1])
        q[:, POS:POS + N_CTX] = 3.0 * eye  # query at position p -> u_p
        k[1:, POS:POS + N_CTX - 1] = 3.0 * eye[1:, 1:]  # key at position p-1 -> u_p
        v[:, TOKEN:TOKEN + D_VOCAB] = eye
        o[PREV:PREV + D_VOCAB] = eye / c0
        o[BAL_PREV] = -1.0 / c0
        # Layer 1's layer norm sees norm^2 = 6 + 1 + 1 (the previous token, balanced).
        c1 = math.sqrt(320 / 8)
        q, k, v, o = _head_weights(model.blocks[1].attn, INDUCTION_HEAD[1])
        q[:, TOKEN:TOKEN + D_VOCAB] = 5.0 * induction_scale * eye
        k[:, PREV:PREV + D_VOCAB] = 5.0 * induction_scale * eye
        v[:, TOKEN:TOKEN + D_VOCAB] = eye * induction_scale
        o[OUT:OUT + D_VOCAB] = eye / c1
        o[BAL_OUT] = -1.0 / c1
        # The unembedding reads only the predicted-next-token subspace.
        model.unembed.weight[:, OUT:OUT + D_VOCAB] = 2.0 * eye
    return model
