"""Weight restrictions for devinterp's LLC on our parameter layout.

devinterp restricts SGLD to part of a model with ``param_masks``: a dict from parameter
name to a boolean mask of that parameter (None: all of it). Its ``create_param_masks``
builds them for TransformerLens models from the names ``blocks.L.attn.W_Q`` ...; our
weights live in fused ``qkv`` / ``out`` / ``fc_in`` / ``fc_out`` parameters (Hugging
Face's layout, so that training runs one matmul), which that table does not know, so it
selects nothing. ``create_param_masks`` here takes the same restriction strings and
gives masks on our parameters, selecting exactly the entries that devinterp's selects in
TransformerLens's layout (tests check them through ``W_Q`` / ``W_O`` / ``W_in`` / ...);
hand them to devinterp through its own ``param_masks`` argument:

>>> masks = create_param_masks(model, "l0h1")
>>> sorted(masks)
['blocks.0.attn.out.weight', 'blocks.0.attn.qkv.bias', 'blocks.0.attn.qkv.weight']
>>> # devinterp.slt.llc.llc(model, dataset, observables, lr=..., n_beta=..., param_masks=masks)
"""

import re

import torch

ParamMasks = dict[str, torch.Tensor | None]

RESTRICTIONS = "'full', 'l0', 'l0h1', 'l0g0', 'l0 attn', 'l0 mlp', 'embed', 'unembed', a parameter name, or a list"


def create_param_masks(model, restriction: str | list[str]) -> ParamMasks:
    """devinterp's weight restriction ``restriction`` as masks on this model's parameters.

    ``"full"``: everything. ``"lL"``: block L. ``"lL attn"`` / ``"lL mlp"``: its
    attention / MLP (without the layer norms, as devinterp's TransformerLens table).
    ``"lLhH"``: head H's rows of ``W_Q`` / ``W_K`` / ``W_V`` and ``b_Q`` / ``b_K`` /
    ``b_V``, and its columns of ``W_O`` (not ``b_O``, which no head owns); ``"lLgG"``
    is the same head (every head is its own key-value group here). ``"embed"`` /
    ``"unembed"``: ``W_E`` / ``W_U`` and ``b_U``; they raise on a model whose
    unembedding is tied to its embedding, where one tensor is both. A parameter name
    selects that parameter; a list selects the union. Anything else raises.
    """
    if isinstance(restriction, (list, tuple)):
        if not restriction:
            raise ValueError("an empty list of restrictions selects nothing; give at least one")
        if "full" in restriction:
            raise ValueError("'full' already selects everything: do not combine it with other restrictions")
        return union([create_param_masks(model, r) for r in restriction])
    if not isinstance(restriction, str):
        raise TypeError(f"a restriction is a string or a list of them ({RESTRICTIONS}), got {restriction!r}")
    params = dict(model.named_parameters())
    r = restriction.strip().lower()
    if r == "full":
        return dict.fromkeys(params)
    if r in ("embed", "unembed"):
        return embedding_masks(model, params, r)
    if m := re.fullmatch(r"l(\d+)\s*([hg])(\d+)", r):
        layer, head = check_layer(model, int(m[1])), int(m[3])
        if head >= model.cfg.n_heads:
            kind = "head" if m[2] == "h" else "key-value group"
            raise ValueError(f"{kind} {head} is out of range: the model has {model.cfg.n_heads} heads "
                             f"(each its own key-value group)")
        return head_masks(model, layer, head)
    if m := re.fullmatch(r"l(\d+)(?:\s+(attn|mlp))?", r):
        layer, part = check_layer(model, int(m[1])), m[2]
        if part == "mlp" and model.cfg.attn_only:
            raise ValueError(f"'{restriction}': this model is attention-only, its blocks have no MLP")
        prefix = f"blocks.{layer}." + (f"{part}." if part else "")
        return {name: None for name in params if name.startswith(prefix)}
    if restriction in params:
        return {restriction: None}
    raise ValueError(f"unknown weight restriction {restriction!r}; use {RESTRICTIONS}")


def check_layer(model, layer: int) -> int:
    if layer >= model.cfg.n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has {model.cfg.n_layers} layers")
    return layer


def embedding_masks(model, params: dict, which: str) -> ParamMasks:
    if model.unembed.weight is model.embed.weight:
        raise ValueError(
            f"'{which}': this model's unembedding is tied to its embedding (one tensor, W_U = W_E^T), so no "
            "restriction selects one without the other; select both with 'embed.weight', or untie them first "
            "(process_weights_() does, as TransformerLens's models always are)"
        )
    names = ["embed.weight"] if which == "embed" else ["unembed.weight", "unembed.bias"]
    return {name: None for name in names if name in params}


def head_masks(model, layer: int, head: int) -> ParamMasks:
    """Head ``head``'s entries of the fused QKV weight and bias and of the output weight."""
    attn = model.blocks[layer].attn
    n_heads, d_head = attn.n_heads, attn.d_head
    prefix = f"blocks.{layer}.attn."
    # Rows of qkv are ordered (q|k|v, head, d_head); columns of out are (head, d_head).
    qkv = torch.zeros(3, n_heads, d_head, dtype=torch.bool)
    qkv[:, head] = True
    masks = {prefix + "qkv.weight": qkv.reshape(-1, 1).expand_as(attn.qkv.weight).clone()}
    if attn.qkv.bias is not None:
        masks[prefix + "qkv.bias"] = qkv.reshape(-1).clone()
    out = torch.zeros(n_heads, d_head, dtype=torch.bool)
    out[head] = True
    masks[prefix + "out.weight"] = out.reshape(1, -1).expand_as(attn.out.weight).clone()
    return masks


def union(masks_list: list[ParamMasks]) -> ParamMasks:
    """The union of several selections: a parameter selected whole by any is selected whole."""
    merged: ParamMasks = {}
    for masks in masks_list:
        for name, mask in masks.items():
            if name in merged and (merged[name] is None or mask is None):
                merged[name] = None
            elif name in merged:
                merged[name] = merged[name] | mask
            else:
                merged[name] = mask
    return merged
