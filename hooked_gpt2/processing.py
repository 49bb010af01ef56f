"""Weight processing as TransformerLens's ``from_pretrained`` does it, in place on a
HookedGPT2: each step leaves the model computing the same log-probabilities (centring
the unembedding shifts each position's logits by a constant) and moves weights to where
an analysis reads them more simply.

- ``fold_ln``: each layer norm's weight and bias move into the weights that read its
  output (W_Q/W_K/W_V, W_in (and SwiGLU's W_gate), W_U and their biases); the layer
  norms become ``LNPre`` (centre and scale only). With ``center_weights`` those reading
  weights are also centred over d_model, since they only ever see a centred stream.
  RMSNorm's weight is folded the same way (it has no bias and does not centre, so
  nothing is centred) and the norms become ``RMSNormPre``, as TransformerLens does.
  QK-norm's per-head norms stay as they are (TransformerLens does not fold them either).
- ``center_writing_weights``: everything that writes to the residual stream (W_E, W_pos,
  W_O, b_O, W_out, b_out) writes mean-zero vectors, which the next layer norm would have
  removed anyway. Skipped for RMSNorm models, which do not remove the mean (as in
  TransformerLens); a rotary model has no W_pos to centre.
- ``center_unembed``: W_U and b_U have zero mean over the vocabulary (logits change by a
  per-position constant; softmax is unchanged).
- ``fold_value_biases``: b_V moves into b_O (each head's pattern sums to 1, so a value
  bias writes a constant).
- ``refactor_factored_attn_matrices`` (off by default, as in TransformerLens): each head's
  W_Q/W_K (with their biases as an extra row) are refactored to equal-norm factors of the
  same QK matrix, and W_V/W_O to the SVD of the OV matrix (U S and V^T).

The unprocessed model stays the default, for training and exact Hugging Face parity;
``HookedGPT2.from_hf(dir, process_weights=True)`` or ``model.process_weights_()`` gives
TransformerLens's defaults. Processing unties the unembedding from the embedding and
gives the unembedding (and the QKV projection, if it had none) a bias.

Every step writes new tensors into the model's parameters (``param.data = ...``) rather
than writing into the old ones, so a tensor the model shares with something else (a
state dict loaded with ``assign=True``, a Hugging Face model, another HookedGPT2) keeps
its values: processing changes this model and nothing else.
"""

import copy

import einops
import torch
from torch import Tensor, nn

from .components import RMSNorm, RMSNormPre
from .factored_matrix import FactoredMatrix
from .model import LayerNorm, LNPre


def _replace(param: nn.Parameter, value: Tensor) -> None:
    """Give ``param`` the new tensor ``value``, leaving its old tensor (maybe shared) as it was."""
    param.data = value


def _own(param: nn.Parameter) -> nn.Parameter:
    """``param`` with a tensor of its own, for steps that write into parts of it."""
    param.data = param.detach().clone()
    return param


def _ensure_bias(linear: nn.Linear) -> Tensor:
    if linear.bias is None:
        linear.bias = nn.Parameter(linear.weight.new_zeros(linear.weight.shape[0]))
    return linear.bias


def _untie_unembedding(model) -> None:
    if model.unembed.weight is model.embed.weight:
        model.unembed.weight = nn.Parameter(model.embed.weight.detach().clone())
        model.cfg.tie_embeddings = False
    _ensure_bias(model.unembed)


def _fold_into(ln: nn.Module, readers: list[nn.Linear], center_weights: bool) -> None:
    """``reader(ln(x))`` with ln's weight and bias moved into each ``reader`` (whose weight
    is ``[out d_model]``): bias += W b, then W *= w, then (optionally) centre W over
    d_model. RMSNorm has no bias, and its readers see an uncentred stream: W *= w only."""
    for reader in readers:
        if isinstance(ln, LayerNorm):
            bias = _ensure_bias(reader)
            _replace(bias, bias + reader.weight @ ln.bias)
        weight = reader.weight * ln.weight
        if center_weights and isinstance(ln, LayerNorm):
            weight = weight - weight.mean(1, keepdim=True)
        _replace(reader.weight, weight)


def _mlp_readers(mlp: nn.Module) -> list[nn.Linear]:
    return [mlp.fc_gate, mlp.fc_in] if hasattr(mlp, "fc_gate") else [mlp.fc_in]


def _center_writer(linear: nn.Linear) -> None:
    """A projection into the residual stream (weight ``[d_model in]``) writes mean-zero vectors."""
    _replace(linear.weight, linear.weight - linear.weight.mean(0, keepdim=True))
    if linear.bias is not None:
        _replace(linear.bias, linear.bias - linear.bias.mean())


@torch.no_grad()
def fold_ln(model, center_weights: bool = True) -> None:
    """Fold every layer norm's weight and bias into the weights that read it; the layer
    norms become ``LNPre`` (``RMSNormPre`` for RMSNorm). A model already folded is left
    as it is."""
    if model.cfg.normalization_type.endswith("Pre"):
        return
    rms = isinstance(model.ln_final, RMSNorm)
    Pre = RMSNormPre if rms else LNPre
    _untie_unembedding(model)
    for block in model.blocks:
        _fold_into(block.ln1, [block.attn.qkv], center_weights)
        block.ln1 = Pre(model.cfg)
        if not model.cfg.attn_only:
            _fold_into(block.ln2, _mlp_readers(block.mlp), center_weights)
            block.ln2 = Pre(model.cfg)
    _fold_into(model.ln_final, [model.unembed], center_weights)
    model.ln_final = Pre(model.cfg)
    model.cfg.normalization_type = "RMSPre" if rms else "LNPre"
    model.cfg.qkv_bias = model.blocks[0].attn.qkv.bias is not None
    model.to(model.W_E.device)  # the new LNPre modules hold nothing, but keep one device
    model.setup_hooks()


@torch.no_grad()
def center_writing_weights(model) -> None:
    """Make W_E, W_pos, W_O, b_O, W_out and b_out write mean-zero vectors."""
    if isinstance(model.ln_final, (RMSNorm, RMSNormPre)):
        raise ValueError("center_writing_weights needs layer norms that remove the mean; RMSNorm does not, "
                         "so centring would change the model (process_weights_ skips it for RMSNorm models)")
    _untie_unembedding(model)  # centring W_E must not centre W_U with it
    for embedding in (model.embed, model.pos_embed) if model.learned_positions else (model.embed,):
        _replace(embedding.weight, embedding.weight - embedding.weight.mean(1, keepdim=True))
    for block in model.blocks:
        _center_writer(block.attn.out)
        if not model.cfg.attn_only:
            _center_writer(block.mlp.fc_out)


@torch.no_grad()
def center_unembed(model) -> None:
    """Give W_U and b_U zero mean over the vocabulary."""
    _untie_unembedding(model)
    _replace(model.unembed.weight, model.unembed.weight - model.unembed.weight.mean(0, keepdim=True))
    _replace(model.unembed.bias, model.unembed.bias - model.unembed.bias.mean())


@torch.no_grad()
def fold_value_biases(model, center: bool = False) -> None:
    """Move b_V into b_O: b_O += sum over heads of b_V[head] @ W_O[head]; b_V = 0. With
    ``center``, b_O is then centred (as TransformerLens does after centring writers)."""
    for block in model.blocks:
        attn = block.attn
        if attn.qkv.bias is None:
            continue
        value_bias = attn.qkv.bias.view(3, -1)[2]
        out_bias = _ensure_bias(attn.out) + attn.out.weight @ value_bias
        _replace(attn.out.bias, out_bias - out_bias.mean() if center else out_bias)
        _own(attn.qkv.bias).view(3, -1)[2] = 0


def _set_head_weights(attn, which: int, W: Tensor, b: Tensor) -> None:
    """Write ``W [head d_model d_head]`` and ``b [head d_head]`` into the fused QKV rows."""
    attn.qkv.weight.view(3, attn.n_heads, attn.d_head, -1)[which] = einops.rearrange(
        W, "head d_model d_head -> head d_head d_model"
    )
    attn.qkv.bias.view(3, attn.n_heads, attn.d_head)[which] = b


def _check_refactorable(model) -> None:
    unsupported = [name for name, present in (("rotary positions", model.cfg.positional == "rotary"),
                                               ("QK-norm", model.cfg.qk_norm)) if present]
    if unsupported:
        raise ValueError(
            f"refactor_factored_attn_matrices is not supported with {' and '.join(unsupported)} (the QK circuit "
            "then depends on more than W_Q and W_K): process with refactor_factored_attn_matrices=False"
        )


@torch.no_grad()
def refactor_factored_attn_matrices(model) -> None:
    """Refactor each head's QK and OV factors (same QK and OV matrices; value biases are
    folded into b_O first, as the OV refactoring requires). Refused with rotary positions
    or QK-norm, which act between W_Q and W_K."""
    _check_refactorable(model)
    fold_value_biases(model)
    for block in model.blocks:
        attn = block.attn
        _ensure_bias(attn.qkv)
        _own(attn.qkv.weight), _own(attn.qkv.bias)  # _set_head_weights writes into them
        W_Q = torch.cat([attn.W_Q, attn.b_Q[:, None, :]], dim=1)  # the bias as an extra input row
        W_K = torch.cat([attn.W_K, attn.b_K[:, None, :]], dim=1)
        Q, K_T = FactoredMatrix(W_Q, W_K.transpose(-2, -1)).make_even().pair
        K = K_T.transpose(-2, -1)
        _set_head_weights(attn, 0, Q[:, :-1], Q[:, -1])
        _set_head_weights(attn, 1, K[:, :-1], K[:, -1])
        U, S, V = FactoredMatrix(attn.W_V, attn.W_O).svd()
        _set_head_weights(attn, 2, U * S[:, None, :], torch.zeros_like(attn.b_V))
        _replace(attn.out.weight, einops.rearrange(V, "head d_model d_head -> d_model (head d_head)").contiguous())
    model.cfg.qkv_bias = True


def process_weights_(
    model, fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
    fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False,
) -> None:
    """TransformerLens's processing, in its order (its ``from_pretrained`` defaults).

    Centring writers assumes a layer norm that removes the mean reads them: as in
    TransformerLens, ``center_writing_weights`` is skipped for RMSNorm models. Refactoring
    the QK matrices is refused with rotary positions or QK-norm, which act between W_Q
    and W_K (TransformerLens refuses rotary too)."""
    if refactor_factored_attn_matrices:
        _check_refactorable(model)  # before any step, so that a refusal leaves the model as it was
    if isinstance(model.ln_final, (RMSNorm, RMSNormPre)):
        center_writing_weights = False
    from . import processing as steps  # the flags shadow the step functions' names

    if fold_ln:
        steps.fold_ln(model)
    if center_writing_weights:
        steps.center_writing_weights(model)
    if center_unembed:
        steps.center_unembed(model)
    if fold_value_biases:
        steps.fold_value_biases(model, center=center_writing_weights)
    if refactor_factored_attn_matrices:
        steps.refactor_factored_attn_matrices(model)


# TransformerLens's processing steps as model methods (``model.fold_layer_norm(...)``):
# given a state dict they return a processed copy, as TransformerLens 3.x does; without
# one they process the model in place.
STEP_FUNCTIONS = {
    "fold_layer_norm": lambda model, fold_biases=True, center_weights=True: fold_ln(model, center_weights),
    "center_writing_weights": lambda model: center_writing_weights(model),
    "center_unembed": lambda model: center_unembed(model),
    "fold_value_biases": lambda model: fold_value_biases(model),
    "refactor_factored_attn_matrices": lambda model: refactor_factored_attn_matrices(model),
}


def apply_step(model, step: str, state_dict: dict | None = None, **options):
    """Run processing ``step`` on ``model`` in place (returning it) or, given a state dict
    in HookedGPT2's layout (``model.state_dict()`` of an unprocessed or processed model),
    on a copy of that state dict, which is returned and never written into."""
    if step == "fold_layer_norm":
        _check_fold_options(model, **options)
    if state_dict is None:
        STEP_FUNCTIONS[step](model, **options)
        return model
    scratch = _model_holding(model, state_dict)
    STEP_FUNCTIONS[step](scratch, **options)
    return {name: tensor.detach().clone() for name, tensor in scratch.state_dict().items()}


def _check_fold_options(model, fold_biases: bool = True, center_weights: bool = True) -> None:
    rms = model.cfg.norm == "rmsnorm"
    if not rms and not fold_biases:
        raise ValueError("fold_biases=False would drop the layer norms' biases, which LNPre has no room for: "
                         "TransformerLens passes it for RMSNorm models only (they have none); fold them (the default)")
    if rms and center_weights:
        raise ValueError("center_weights=True on an RMSNorm model: its readers see an uncentred stream, so centring "
                         "them would change the model (TransformerLens would do it anyway); pass center_weights=False, "
                         "as TransformerLens's own processing of RMSNorm models does")


def _model_holding(model, state_dict: dict) -> nn.Module:
    """A model of ``model``'s class and shape holding ``state_dict``'s tensors (no copies),
    built for the processing stage the state dict is at: folded or not, with the biases
    and the (always untied) unembedding its keys say it has."""
    if any(name.endswith((".W_Q", ".W_E", ".W_U")) for name in state_dict):
        raise ValueError(
            "this state dict is in TransformerLens's layout (embed.W_E, blocks.0.attn.W_Q, ...); HookedGPT2's fuses Q, "
            "K and V (blocks.0.attn.qkv.weight): pass the state_dict() of a HookedGPT2 (see docs/transformerlens.md)"
        )
    cfg = copy.copy(model.cfg)
    cfg.normalization_type = "RMS" if cfg.norm == "rmsnorm" else "LN"
    cfg.qkv_bias = "blocks.0.attn.qkv.bias" in state_dict
    cfg.attn_bias = "blocks.0.attn.out.bias" in state_dict
    cfg.mlp_bias = cfg.attn_only or "blocks.0.mlp.fc_out.bias" in state_dict  # fc_in's may come from folding
    cfg.tie_embeddings = False  # processing unties before writing either, so untied is equivalent
    state_dict = dict(state_dict)
    state_dict.setdefault("unembed.weight", state_dict.get("embed.weight"))
    with torch.device("meta"):
        scratch = type(model)(cfg)
    if "ln_final.weight" not in state_dict:
        fold_ln(scratch)
    if "unembed.bias" in state_dict:
        _ensure_bias(scratch.unembed)
    try:
        scratch.load_state_dict(state_dict, assign=True)
    except RuntimeError as e:
        raise ValueError(f"the state dict does not fit this model's architecture at any processing stage: {e}") from None
    return scratch.eval()
