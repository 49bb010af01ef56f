"""ActivationCache: the activations of one run, by hook name, with the decompositions
TransformerLens users know (accumulated and decomposed residual streams, per-head and
per-neuron results, layer norm applied to a stack, logit attributions), computing what
TransformerLens 3.x computes (``tests/test_tl_parity.py`` holds it to that).

As in TransformerLens, ``apply_ln_to_stack`` centres and divides by the cached scale and
leaves the layer norm's weight and bias to the weights that read the stream: with
folded layer norms (``process_weights=True``) the result times ``W_U`` is each
component's direct contribution to the logits.
"""

import difflib
import re
import warnings
from collections.abc import Iterator

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from .hook_points import HookError

BLOCK_HOOKS = {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn_in", "q_input", "k_input",
               "v_input", "mlp_in"}
ATTN_HOOKS = {"q", "k", "v", "z", "attn_scores", "pattern", "result", "rot_q", "rot_k"}
MLP_HOOKS = {"pre", "post", "pre_linear"}
LN_HOOKS = {"scale", "normalized"}
# TransformerLens's aliases of activation names and of layer types.
ALIASES = {"attn": "pattern", "scores": "attn_scores", "attn_logits": "attn_scores", "key": "k", "query": "q",
           "value": "v", "mlp_pre": "pre", "mlp_post": "post"}
LAYER_TYPES = {"ln1": "ln1", "ln2": "ln2", "a": "attn", "attn": "attn", "attention": "attn", "m": "mlp", "mlp": "mlp",
               "b": "", "block": "", "blocks": "", "": ""}
ACTIVATIONS = {"embed", "pos_embed"} | BLOCK_HOOKS | ATTN_HOOKS | MLP_HOOKS | LN_HOOKS
SHORT_NAMES = ACTIVATIONS | set(ALIASES)
SHORTHAND = re.compile(r"([a-z_]*[a-z])(\d+)([a-z]\w*)?")  # "k1", "scale2ln1", "pattern0a"


def get_act_name(
    name: str, layer: int | None = None, layer_type: str | None = None, n_layers: int | None = None
) -> str:
    """Short name to full hook name, understanding TransformerLens's forms:
    ``("pattern", 0)`` and ``"pattern0"`` -> ``"blocks.0.attn.hook_pattern"``,
    ``("scale", 2, "ln1")`` and ``"scale2ln1"`` -> ``"blocks.2.ln1.hook_scale"``;
    ``"scale"`` alone is the final layer norm's. A full name comes back unchanged.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    shorthand = SHORTHAND.fullmatch(name) if layer is None else None
    if shorthand:
        name, layer, layer_type = shorthand.group(1), int(shorthand.group(2)), shorthand.group(3)
    name = ALIASES.get(name, name)
    if name not in ACTIVATIONS:
        close = difflib.get_close_matches(name, sorted(SHORT_NAMES), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "the short names are " + ", ".join(
            sorted(ACTIVATIONS))
        raise HookError(f"unknown activation {name!r}; {hint} (or use a full hook name, see model.hook_names())")
    if layer_type is not None and layer_type not in LAYER_TYPES:
        raise HookError(f"unknown layer type {layer_type!r}; use one of 'ln1', 'ln2', 'attn', 'mlp'")
    if name in ("embed", "pos_embed"):
        return f"hook_{name}"
    if name in LN_HOOKS and layer is None:
        return f"ln_final.hook_{name}"
    if layer is None:
        raise HookError(f"{name!r} needs a layer: get_act_name({name!r}, 0), or cache[{name!r}, 0]")
    layer = int(layer)
    if n_layers is not None:
        if not -n_layers <= layer < n_layers:
            raise HookError(f"layer {layer} is out of range for a {n_layers}-layer model")
        layer %= n_layers
    if name in BLOCK_HOOKS:
        return f"blocks.{layer}.hook_{name}"
    if name in ATTN_HOOKS:
        return f"blocks.{layer}.attn.hook_{name}"
    if name in MLP_HOOKS:
        return f"blocks.{layer}.mlp.hook_{name}"
    if name in LN_HOOKS:
        if layer_type not in ("ln1", "ln2"):
            raise HookError(f"{name!r} in a block needs the layer norm: cache[{name!r}, {layer}, 'ln1' or 'ln2']")
        return f"blocks.{layer}.{layer_type}.hook_{name}"
    raise AssertionError(f"{name!r} is in ACTIVATIONS but has no hook name")  # unreachable: every set is handled


def slice_pos(tensor: Tensor, pos_slice, dim: int) -> Tensor:
    """Apply a selection as TransformerLens's ``Slice`` does along ``dim``: None keeps all,
    an int selects (dropping the axis), a tuple is ``slice(*tuple)``, a slice slices, and a
    list / array / tensor of ints gathers."""
    if pos_slice is None:
        return tensor
    if isinstance(pos_slice, tuple):
        pos_slice = slice(*pos_slice)
    if isinstance(pos_slice, int):
        return tensor.select(dim, pos_slice)
    if isinstance(pos_slice, slice):
        index = [slice(None)] * tensor.dim()
        index[dim] = pos_slice
        return tensor[tuple(index)]
    dim = dim % tensor.dim()
    index = torch.as_tensor(pos_slice, device=tensor.device).long().reshape(-1)
    return tensor.index_select(dim, torch.where(index < 0, index + tensor.shape[dim], index))  # -1 is the last


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
        try:
            return self._full_name(key) in self.cache_dict
        except KeyError:  # an unknown short name is simply not in the cache
            return False

    def _full_name(self, key) -> str:
        if isinstance(key, tuple):
            return get_act_name(*key, n_layers=self.model.cfg.n_layers)
        if "." not in key and not key.startswith("hook_"):  # "embed", "scale", "k1", "scale0ln1", a misspelling
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

    def apply_slice_to_batch_dim(self, batch_slice) -> "ActivationCache":
        """A new cache of the batch rows ``batch_slice`` selects (an int drops the batch
        axis; a tuple, slice or list of rows keeps it), as ``slice_pos`` selects."""
        if not self.has_batch_dim:
            if batch_slice is None:
                return ActivationCache(dict(self.cache_dict), self.model, has_batch_dim=False)
            raise ValueError("this cache has no batch axis (remove_batch_dim): there are no rows to select")
        sliced = {name: slice_pos(value, batch_slice, 0) for name, value in self.cache_dict.items()}
        return ActivationCache(sliced, self.model, has_batch_dim=not isinstance(batch_slice, int))

    def toggle_autodiff(self, mode: bool = False) -> None:
        """``torch.set_grad_enabled(mode)``: global state, for all of torch, as in
        TransformerLens (which warns too). ``torch.no_grad()`` as a context manager is safer."""
        warnings.warn(f"changed torch's global state: autodiff is now {'on' if mode else 'off'}", stacklevel=2)
        torch.set_grad_enabled(mode)

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

    # Residual-stream decompositions. As in TransformerLens, pos_slice cuts the
    # second-to-last axis of every component (pos, with or without a batch axis).
    def accumulated_resid(
        self, layer=None, incl_mid=False, apply_ln=False, pos_slice=None, mlp_input=False, return_labels=False
    ):
        """The residual stream after each layer: ``[component batch pos d_model]``.

        Components are ``resid_pre`` of layers 0..layer (with ``resid_mid`` too if
        ``incl_mid``), and ``final_post`` when layer is None (all layers). With
        ``apply_ln`` at the final layer (the logit lens), ``ln_final`` is applied to each
        component with its own statistics (TransformerLens >= 3.3; 3.0-3.2 divided every
        component by the final stream's cached scale); at an earlier layer, each component
        is centred and divided by that layer's cached scale.
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
        stack = torch.stack([slice_pos(c, pos_slice, -2) for c in components])
        if apply_ln and layer == self.n_layers:
            with torch.no_grad():
                stack = self.model.ln_final(stack.to(self.model.W_U.device)).to(stack.device)
        elif apply_ln:
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
            empty = slice_pos(self["resid_pre", 0], pos_slice, -2)
            stack = empty.new_zeros((0, *empty.shape))
        else:
            stack = torch.stack([slice_pos(c, pos_slice, -2) for c in components])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def compute_head_results(self) -> None:
        """Fill in ``hook_result`` for every layer from the cached ``hook_z`` and ``W_O``
        (kept if already cached: it is the same product)."""
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
            result = slice_pos(self["result", l], pos_slice, -3)
            components.append(einops.rearrange(result, "... head d_model -> head ... d_model"))
            labels += [f"L{l}H{h}" for h in range(result.shape[-2])]
        return self._per_writer_stack(components, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels)

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None) -> Tensor:
        """``cache[activation_name, l, sublayer_type]`` stacked over layers ``l < layer``
        (all layers by default): ``[layer ...]``."""
        layer = self._layer(layer)
        return torch.stack([self[activation_name, l, sublayer_type] for l in range(layer)])

    def get_neuron_results(self, layer: int, neuron_slice=None, pos_slice=None) -> Tensor:
        """Each neuron's write into the residual stream, ``[batch pos neuron d_model]``:
        its activation (``hook_post``) times its row of ``W_out``."""
        acts = slice_pos(slice_pos(self["post", layer], pos_slice, -2), neuron_slice, -1)
        W_out = slice_pos(self.model.blocks[layer].mlp.W_out.detach().to(acts.device), neuron_slice, 0)
        return acts[..., None] * W_out

    def stack_neuron_results(
        self, layer: int, pos_slice=None, neuron_slice=None, return_labels=False, incl_remainder=False,
        apply_ln=False,
    ):
        """Every neuron's write from the layers before ``layer``,
        ``[layer*neuron batch pos d_model]``, labelled ``L{layer}N{neuron}``; with
        ``incl_remainder``, a last component holds the rest of the stream at ``layer``."""
        layer = self._layer(layer)
        neurons = slice_pos(torch.arange(self.model.cfg.d_mlp), neuron_slice, 0).reshape(-1).tolist()
        labels = [f"L{l}N{n}" for l in range(layer) for n in neurons]
        components = [
            einops.rearrange(self.get_neuron_results(l, neuron_slice, pos_slice), "... neuron d_model -> neuron ... d_model")
            for l in range(layer)
        ]
        return self._per_writer_stack(components, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels)

    def _per_writer_stack(self, components, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels):
        """Heads' or neurons' writes as one stack, with the stream's ``remainder`` and the
        layer norm's normalisation if asked for."""
        resid = slice_pos(self._resid_at(layer, False), pos_slice, -2)
        stack = torch.cat(components) if components else resid.new_zeros((0, *resid.shape))
        if incl_remainder:
            stack = torch.cat([stack, (resid - stack.sum(0))[None]])
            labels = [*labels, "remainder"]
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(
        self, layer=None, mlp_input=False, expand_neurons=True, apply_ln=False, pos_slice=None, return_labels=False
    ):
        """The stream at ``layer`` as heads, then neurons (or whole MLPs without
        ``expand_neurons``), then ``embed``, ``pos_embed`` and a last ``bias`` component
        (every bias written so far, ``model.accumulated_bias``): they sum to the stream."""
        layer = self._layer(layer)
        heads, labels = self.stack_head_results(layer + (1 if mlp_input else 0), pos_slice=pos_slice, return_labels=True)
        components = [heads]
        if not self.model.cfg.attn_only and layer > 0:
            if expand_neurons:
                mlps, mlp_labels = self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True)
            else:
                mlps, mlp_labels = self.decompose_resid(
                    layer, mlp_input=mlp_input, mode="mlp", pos_slice=pos_slice, incl_embeds=False, return_labels=True
                )
            components.append(mlps)
            labels = labels + mlp_labels
        for name in ("embed", "pos_embed"):
            components.append(slice_pos(self[name], pos_slice, -2)[None])
            labels.append(name)
        bias = self.model.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons).detach()
        components.append(bias.to(heads.device).expand(1, *heads.shape[1:]))
        labels.append("bias")
        stack = torch.cat(components)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(
        self, residual_stack: Float[Tensor, "component ... d_model"], layer=None, mlp_input=False, pos_slice=None,
        batch_slice=None, has_batch_dim=True,
    ) -> Float[Tensor, "component ... d_model"]:
        """Apply, to each component of a residual stack, the normalisation of the layer
        norm that reads the stream at ``layer`` (the final one when None), as a linear map:
        centre, then divide by the scale cached for the whole stream. As in
        TransformerLens, the layer norm's weight and bias are left out (with folded layer
        norms they live in the weights that read the stream, so the result times ``W_U``
        is each component's direct logit contribution).

        ``pos_slice`` / ``batch_slice`` say which positions / batch rows the stack holds
        (the cached scale is cut to match); with ``has_batch_dim``, ``batch_slice`` also
        cuts the stack's batch axis (axis 1), as in TransformerLens. A stack without its
        batch axis (``has_batch_dim=False``) uses the first sequence's scale unless
        ``batch_slice`` picks one."""
        layer = self._layer(layer)
        if layer == self.n_layers:
            scale_name = "ln_final.hook_scale"
        else:
            scale_name = f"blocks.{layer}.{'ln2' if mlp_input else 'ln1'}.hook_scale"
        if scale_name not in self.cache_dict:
            raise KeyError(f"apply_ln_to_stack needs {scale_name!r} in the cache: include it in names_filter")
        if has_batch_dim and batch_slice is not None:
            residual_stack = slice_pos(residual_stack, batch_slice, 1)
        scale = slice_pos(self.cache_dict[scale_name], pos_slice, -2)
        if self.has_batch_dim and batch_slice is not None:
            scale = slice_pos(scale, batch_slice, 0)
        if self.has_batch_dim and not has_batch_dim and not isinstance(batch_slice, int):
            # A stack without its batch axis is one sequence's: the first one's scale (where
            # TransformerLens would broadcast the batch axis against the components).
            scale = scale[0]
        if self.model.cfg.norm == "rmsnorm":  # RMSNorm does not centre
            return residual_stack / scale
        centred = residual_stack - residual_stack.mean(-1, keepdim=True)
        return centred / scale

    def logit_attrs(
        self, residual_stack: Float[Tensor, "component ... d_model"], tokens, incorrect_tokens=None,
        pos_slice=None, batch_slice=None, has_batch_dim=True,
    ) -> Float[Tensor, "component ..."]:
        """Each component's direct contribution to the logit of ``tokens`` (minus that of
        ``incorrect_tokens``). As in TransformerLens, pass the raw stack: the final layer
        norm's normalisation is applied here (``apply_ln_to_stack``, with ``pos_slice`` /
        ``batch_slice`` saying which positions and rows the stack holds), then each
        component is dotted with ``W_U[:, tokens]``.

        ``tokens`` is a token id, a single-token string, or ids broadcasting against the
        stack's remaining axes (``[batch]`` for a stack already cut to one position); they
        are used as given, never sliced. With folded layer norms (``process_weights=True``)
        the components sum to the logit (difference) minus ``b_U``'s share; unfolded,
        the final layer norm's weight and bias are not applied (as in TransformerLens).
        """
        directions = self.model.tokens_to_residual_directions(tokens).detach()
        if incorrect_tokens is not None:
            if _token_shape(self.model, tokens) != _token_shape(self.model, incorrect_tokens):
                raise ValueError(
                    f"tokens and incorrect_tokens must have the same shape, got "
                    f"{_token_shape(self.model, tokens)} and {_token_shape(self.model, incorrect_tokens)}"
                )
            directions = directions - self.model.tokens_to_residual_directions(incorrect_tokens).detach()
        scaled = self.apply_ln_to_stack(
            residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim
        )
        return (scaled * directions.to(scaled.device)).sum(-1)


def _token_shape(model, tokens) -> tuple:
    return () if isinstance(tokens, (str, int)) else tuple(torch.as_tensor(tokens).shape)
