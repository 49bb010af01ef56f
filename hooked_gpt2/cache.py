"""ActivationCache: the activations of one run, by hook name, with the decompositions
TransformerLens users know (accumulated and decomposed residual streams, per-head
results, layer norm applied to a stack, logit attributions).

Our model keeps its layer-norm weights unfolded, so ``apply_ln_to_stack`` centres,
divides by the cached scale and multiplies by the layer norm's weight: the result times
``W_U`` is each component's direct contribution to the logits. The layer norm's bias
belongs to no component; it (through ``W_U``) is the constant remainder of a logit.
"""

from collections.abc import Iterator

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from .components import RMSNorm

BLOCK_HOOKS = {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"}
ATTN_HOOKS = {"q", "k", "v", "z", "attn_scores", "pattern", "result", "rot_q", "rot_k"}
MLP_HOOKS = {"pre", "post", "pre_linear"}
LN_HOOKS = {"scale", "normalized"}
ALIASES = {"attn": "pattern", "scores": "attn_scores"}
SHORT_NAMES = {"embed", "pos_embed"} | BLOCK_HOOKS | ATTN_HOOKS | MLP_HOOKS | LN_HOOKS | set(ALIASES)


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None, n_layers: int | None = None) -> str:
    """Short name to full hook name: ``("pattern", 0)`` -> ``"blocks.0.attn.hook_pattern"``.

    Layer norms take a type: ``("scale", 2, "ln1")``; ``("scale",)`` is the final layer norm.
    """
    name = ALIASES.get(name, name)
    if name in ("embed", "pos_embed"):
        return f"hook_{name}"
    if name in LN_HOOKS and layer is None:
        return f"ln_final.hook_{name}"
    if layer is None:
        raise KeyError(f"{name!r} needs a layer, e.g. cache[{name!r}, 0]")
    if n_layers is not None:
        if not -n_layers <= layer < n_layers:
            raise KeyError(f"layer {layer} is out of range for a {n_layers}-layer model")
        layer %= n_layers
    if name in BLOCK_HOOKS:
        return f"blocks.{layer}.hook_{name}"
    if name in ATTN_HOOKS:
        return f"blocks.{layer}.attn.hook_{name}"
    if name in MLP_HOOKS:
        return f"blocks.{layer}.mlp.hook_{name}"
    if name in LN_HOOKS:
        if layer_type not in ("ln1", "ln2"):
            raise KeyError(f"{name!r} in a block needs the layer norm: cache[{name!r}, {layer}, 'ln1' or 'ln2']")
        return f"blocks.{layer}.{layer_type}.hook_{name}"
    raise KeyError(f"unknown activation {name!r}; use a full hook name (see model.hook_names())")


def slice_pos(tensor: Tensor, pos_slice, dim: int) -> Tensor:
    """Apply a position selection (None, int, slice or list of ints) along ``dim``."""
    if pos_slice is None:
        return tensor
    if isinstance(pos_slice, int):
        return tensor.select(dim, pos_slice)
    if isinstance(pos_slice, slice):
        index = [slice(None)] * tensor.dim()
        index[dim] = pos_slice
        return tensor[tuple(index)]
    return tensor.index_select(dim, torch.as_tensor(pos_slice, device=tensor.device))


class ActivationCache:
    """Activations by hook name. ``cache["blocks.0.attn.hook_pattern"]`` or ``cache["pattern", 0]``.

    >>> logits, cache = model.run_with_cache(tokens)
    >>> resid, labels = cache.decompose_resid(return_labels=True)
    """

    def __init__(self, cache_dict: dict[str, Tensor], model, has_batch_dim: bool = True):
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    # Mapping behaviour.
    def __getitem__(self, key) -> Tensor:
        key = self._full_name(key)
        if key not in self.cache_dict:
            if key in self.model.hook_dict:
                raise KeyError(f"{key!r} was not cached: include it in run_with_cache's names_filter")
            self.model.check_name(key.removesuffix("_grad"))
            raise KeyError(f"{key!r} was not cached (gradients need incl_bwd=True)")
        return self.cache_dict[key]

    def __contains__(self, key) -> bool:
        return self._full_name(key) in self.cache_dict

    def _full_name(self, key) -> str:
        if isinstance(key, tuple):
            return get_act_name(*key, n_layers=self.model.cfg.n_layers)
        if key in SHORT_NAMES:  # "embed", "scale", ...
            return get_act_name(key, n_layers=self.model.cfg.n_layers)
        return key  # a full name; __getitem__ names the closest valid ones if it is unknown

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict)}"

    def to(self, device) -> "ActivationCache":
        """Move every activation to ``device`` (in place; returns the cache)."""
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        return self

    def remove_batch_dim(self) -> "ActivationCache":
        if not self.has_batch_dim:
            return self
        for key, value in self.cache_dict.items():
            if value.shape[0] != 1:
                raise ValueError(f"cannot remove a batch dimension of size {value.shape[0]} ({key})")
        self.cache_dict = {k: v[0] for k, v in self.cache_dict.items()}
        self.has_batch_dim = False
        return self

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    def _pos_dim(self, has_batch_dim: bool | None = None) -> int:
        return 1 if (self.has_batch_dim if has_batch_dim is None else has_batch_dim) else 0

    def _layer(self, layer: int | None) -> int:
        if layer is None:
            return self.n_layers
        if -self.n_layers - 1 <= layer < 0:
            layer += self.n_layers + 1  # -1 is after the last block, as TransformerLens
        if not 0 <= layer <= self.n_layers:
            raise ValueError(f"layer must be in [0, {self.n_layers}] (n_layers means after the last block), got {layer}")
        return layer

    def _resid_at(self, layer: int, mlp_input: bool) -> Tensor:
        if layer == self.n_layers:
            return self["resid_post", self.n_layers - 1]
        return self["resid_mid", layer] if mlp_input else self["resid_pre", layer]

    # Residual-stream decompositions.
    def accumulated_resid(
        self, layer=None, incl_mid=False, apply_ln=False, pos_slice=None, mlp_input=False, return_labels=False
    ):
        """The residual stream after each layer: ``[component batch pos d_model]``.

        Components are ``resid_pre`` of layers 0..layer (with ``resid_mid`` too if
        ``incl_mid``), and ``final_post`` when layer is None (all layers).
        """
        layer = self._layer(layer)
        if (incl_mid or mlp_input) and self.model.cfg.attn_only:
            raise ValueError("an attention-only model has no resid_mid")
        components, labels = [], []
        for l in range(layer + 1):
            if l == self.n_layers:
                components.append(self["resid_post", self.n_layers - 1])
                labels.append("final_post")
                continue
            components.append(self["resid_pre", l])
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                components.append(self["resid_mid", l])
                labels.append(f"{l}_mid")
        stack = slice_pos(torch.stack(components), pos_slice, 1 + self._pos_dim())
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self, layer=None, mlp_input=False, mode="all", apply_ln=False, pos_slice=None, incl_embeds=True,
        return_labels=False,
    ):
        """The residual stream at ``layer`` split into what wrote it: embeddings, then each
        layer's ``attn_out`` and ``mlp_out`` (``mode`` "attn" or "mlp" keeps one kind).
        With every component included they sum to ``resid_pre`` of ``layer`` (the final
        ``resid_post`` when layer is None)."""
        layer = self._layer(layer)
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        components, labels = [], []
        if incl_embeds:  # rotary models have no pos_embed: positions act inside attention
            labels += [name for name in ("embed", "pos_embed") if f"hook_{name}" in self.cache_dict]
            components += [self[name] for name in labels]
        for l in range(layer + (1 if mlp_input and layer < self.n_layers else 0)):
            if mode in ("all", "attn"):
                components.append(self["attn_out", l])
                labels.append(f"{l}_attn_out")
            if mode in ("all", "mlp") and not self.model.cfg.attn_only and l < layer:
                components.append(self["mlp_out", l])
                labels.append(f"{l}_mlp_out")
        if not components:  # e.g. mode="mlp" at layer 0 without embeddings
            stack = self["resid_pre", 0].new_zeros((0, *self["resid_pre", 0].shape))
        else:
            stack = torch.stack(components)
        stack = slice_pos(stack, pos_slice, 1 + self._pos_dim())
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def compute_head_results(self) -> None:
        """Fill in ``hook_result`` for every layer from the cached ``hook_z`` and ``W_O``."""
        for l in range(self.n_layers):
            name = get_act_name("result", l)
            if name not in self.cache_dict:
                W_O = self.model.blocks[l].attn.W_O.detach().to(self["z", l].device)
                self.cache_dict[name] = einops.einsum(
                    self["z", l], W_O, "... head d_head, head d_head d_model -> ... head d_model"
                )

    def stack_head_results(
        self, layer=None, return_labels=False, incl_remainder=False, pos_slice=None, apply_ln=False
    ):
        """Every head's write into the residual stream, ``[layer*head batch pos d_model]``,
        labelled ``L{layer}H{head}``; with ``incl_remainder``, a last component holds the
        rest of the residual stream at ``layer`` (embeddings, MLPs, attention biases)."""
        layer = self._layer(layer)
        if any(get_act_name("result", l) not in self.cache_dict for l in range(layer)):
            self.compute_head_results()
        components, labels = [], []
        for l in range(layer):
            result = self["result", l]
            components.append(einops.rearrange(result, "... head d_model -> head ... d_model"))
            labels += [f"L{l}H{h}" for h in range(result.shape[-2])]
        stack = torch.cat(components) if components else self._resid_at(layer, False)[None] * 0
        if incl_remainder:
            remainder = self._resid_at(layer, False) - stack.sum(0)
            stack = torch.cat([stack, remainder[None]])
            labels.append("remainder")
        stack = slice_pos(stack, pos_slice, 1 + self._pos_dim())
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(
        self, residual_stack: Float[Tensor, "... d_model"], layer=None, mlp_input=False, pos_slice=None,
        batch_slice=None, has_batch_dim=True,
    ) -> Float[Tensor, "... d_model"]:
        """Apply, to each component of a residual stack, the layer norm that reads the
        stream at ``layer`` (the final one when None) as a linear map: centre, divide by the
        scale cached for the full stream, multiply by the weight. Summing the components
        then gives the layer norm's output minus its bias."""
        layer = self._layer(layer)
        if layer == self.n_layers:
            ln, scale_name = self.model.ln_final, "ln_final.hook_scale"
        else:
            kind = "ln2" if mlp_input else "ln1"
            ln, scale_name = getattr(self.model.blocks[layer], kind), f"blocks.{layer}.{kind}.hook_scale"
        if scale_name not in self.cache_dict:
            raise KeyError(f"apply_ln_to_stack needs {scale_name!r} in the cache: include it in names_filter")
        scale = self.cache_dict[scale_name]
        if self.has_batch_dim and batch_slice is not None:
            scale = scale[batch_slice]
        if self.has_batch_dim and not has_batch_dim:
            scale = scale[0]
        scale = slice_pos(scale, pos_slice, self._pos_dim(has_batch_dim and self.has_batch_dim))
        centred = residual_stack  # RMSNorm does not centre
        if not isinstance(ln, RMSNorm):
            centred = residual_stack - residual_stack.mean(-1, keepdim=True)
        return centred / scale * ln.weight.detach().to(scale.device)

    def logit_attrs(
        self, residual_stack: Float[Tensor, "component ... d_model"], tokens, incorrect_tokens=None,
        pos_slice=None, batch_slice=None, has_batch_dim=True,
    ) -> Float[Tensor, "component ..."]:
        """Each component's direct contribution to the logit of ``tokens`` (minus that of
        ``incorrect_tokens``). As in TransformerLens, pass the raw stack: the final layer
        norm is applied here (``apply_ln_to_stack``), then each component is dotted with
        ``W_U``. The components sum to the logit minus the final layer norm's bias term.

        ``tokens`` is a token id, a single-token string, or ids shaped like the stack's
        batch/position axes (before ``pos_slice`` / ``batch_slice`` are applied)."""
        directions = self._unembed_directions(tokens, pos_slice, batch_slice, has_batch_dim)
        if incorrect_tokens is not None:
            directions = directions - self._unembed_directions(incorrect_tokens, pos_slice, batch_slice, has_batch_dim)
        scaled = self.apply_ln_to_stack(
            residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim
        )
        return (scaled * directions.to(scaled.device)).sum(-1)

    def _unembed_directions(self, tokens, pos_slice=None, batch_slice=None, has_batch_dim=True) -> Tensor:
        if isinstance(tokens, str):
            ids = self.model.tokenizer.encode_ordinary(tokens)
            if len(ids) != 1:
                raise ValueError(f"{tokens!r} is {len(ids)} tokens, not one: choose a single-token answer")
            tokens = ids[0]
        tokens = torch.as_tensor(tokens, device=self.model.W_U.device)
        if tokens.dim() > 0:
            if has_batch_dim and batch_slice is not None:
                tokens = tokens[batch_slice]
            tokens = slice_pos(tokens, pos_slice, tokens.dim() - 1)
        return einops.rearrange(self.model.W_U.detach()[:, tokens], "d_model ... -> ... d_model")
