"""Caching a run's activations: the hooks that store them (TransformerLens's
``get_caching_hooks``, ``add_caching_hooks``, ``cache_all``) and ``run_with_cache``,
which attaches them for one forward pass and wraps what they stored in an
``ActivationCache``.

As in TransformerLens, the run keeps torch's grad mode: with grad enabled the output
keeps its ``grad_fn`` (``metric(logits).backward()`` works), while what is cached is
detached. ``pos_slice`` cuts the position axis of each cached tensor: the third from
last for per-head activations ``[batch pos head_index ...]``, the second from last for
the rest (the query axis of attention scores and patterns); an int keeps the axis (as
``[i]`` does), as TransformerLens's does.
"""

import functools
import warnings

import torch

from .cache import ActivationCache, slice_pos
from .losses import next_token_loss

# Per-head activations, [batch pos head_index ...]: position is the third axis from the end.
HEAD_AXIS_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_rot_q", "hook_rot_k", "hook_attn_in",
                   "hook_q_input", "hook_k_input", "hook_v_input")
# Of those, the ones TransformerLens's pos_slice treats as [... pos d] (it cuts their head axis).
TL_CUTS_HEADS = ("hook_rot_q", "hook_rot_k", "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")


class CachingMixin:
    """``run_with_cache`` and TransformerLens's caching hooks for a ``HookedRootModule``."""

    def cached_names(self, names_filter=None) -> list[str]:
        """The hook names ``names_filter`` selects for caching (unknown names raise). As in
        TransformerLens, no filter (or a function) leaves ``hook_result`` out unless
        ``set_use_attn_result(True)``: caching it would make every head's result be computed."""
        names = self.resolve_names(names_filter)
        if (names_filter is None or callable(names_filter)) and not self.cfg.use_attn_result:
            names = [name for name in names if not name.endswith("attn.hook_result")]
        return names

    def get_caching_hooks(
        self, names_filter=None, incl_bwd: bool = False, device=None, remove_batch_dim: bool = False,
        cache: dict | None = None, pos_slice=None,
    ) -> tuple[dict, list, list]:
        """Hooks that store activations (and with ``incl_bwd`` gradients, as ``name +
        "_grad"``) into ``cache`` (a new dict by default), detached, moved to ``device``, without
        their batch axis if ``remove_batch_dim``, cut to ``pos_slice``: ``(cache, fwd_hooks,
        bwd_hooks)``, not attached (``with model.hooks(fwd_hooks, bwd_hooks): ...``).

        >>> cache, fwd, _ = model.get_caching_hooks(lambda name: name.endswith("hook_pattern"))
        >>> with model.hooks(fwd_hooks=fwd):
        ...     logits = model(tokens)
        >>> cache["blocks.0.attn.hook_pattern"].shape  # [batch head_index query_pos key_pos]
        torch.Size([1, 4, 7, 7])
        """
        cache = {} if cache is None else cache
        names = self.cached_names(names_filter)
        if isinstance(pos_slice, int):
            pos_slice = [pos_slice]  # keeps the position axis
        if pos_slice is not None and any(name.endswith(TL_CUTS_HEADS) and self._fires(name) for name in names):
            warnings.warn(
                "pos_slice cuts the position axis of hook_rot_q/rot_k/attn_in/q_input/k_input/v_input; "
                "TransformerLens cuts their head axis instead", stacklevel=3,
            )

        def save(tensor, hook, suffix=""):
            tensor = tensor.detach()
            if device is not None:
                tensor = tensor.to(device)
            if remove_batch_dim:
                tensor = tensor[0]
            if pos_slice is not None:
                axis = -3 if hook.name.endswith(HEAD_AXIS_HOOKS) else -2
                if tensor.dim() >= -axis:
                    tensor = slice_pos(tensor, pos_slice, axis)
            cache[hook.name + suffix] = tensor

        fwd_hooks = [(name, save) for name in names]
        bwd_hooks = [(name, functools.partial(save, suffix="_grad")) for name in names] if incl_bwd else []
        return cache, fwd_hooks, bwd_hooks

    def _fires(self, name: str) -> bool:
        """Whether an optional per-head-input hook fires in this model's configuration."""
        switches = {"hook_attn_in": self.cfg.use_attn_in, "hook_mlp_in": self.cfg.use_hook_mlp_in,
                    **dict.fromkeys(("hook_q_input", "hook_k_input", "hook_v_input"), self.cfg.use_split_qkv_input)}
        return switches.get(name.rpartition(".")[2], True)

    def add_caching_hooks(self, names_filter=None, incl_bwd: bool = False, device=None,
                          remove_batch_dim: bool = False, cache: dict | None = None) -> dict:
        """Attach caching hooks until ``reset_hooks()``; every forward pass then stores into
        the returned dict (``cache``, if given)."""
        cache, fwd_hooks, bwd_hooks = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache)
        for direction, hooks in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
            for name, fn in hooks:
                self.add_hook(name, fn, dir=direction)
        return cache

    def cache_all(self, cache: dict, incl_bwd: bool = False, device=None, remove_batch_dim: bool = False) -> None:
        """Store every activation of the following forward passes into ``cache`` until
        ``reset_hooks()`` (TransformerLens's older spelling of ``add_caching_hooks``)."""
        if not isinstance(cache, dict):
            raise TypeError(f"cache_all fills a dict you pass (cache = {{}}; model.cache_all(cache)), got {cache!r}")
        self.add_caching_hooks(None, incl_bwd, device, remove_batch_dim, cache)

    def run_with_cache(
        self,
        *model_args,
        names_filter=None,
        device=None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        pos_slice=None,
        metric=None,
        return_cache_object: bool = True,
        **model_kwargs,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """Run the model (``forward``'s arguments: ids or text, ``return_type=``, ...) and
        keep the activations that ``names_filter`` selects: a name, a list of names, or a
        function of the name. With no filter (or a function), every hook that fires;
        ``hook_result`` fires only with ``set_use_attn_result(True)``, as in TransformerLens.

        The run keeps torch's grad mode, as in TransformerLens: the output has a
        ``grad_fn`` when grad is enabled, and the cached activations are detached (wrap the
        call in ``torch.no_grad()`` when no gradient is wanted, to spare the memory). With
        ``incl_bwd``, gradients are stored as ``name + "_grad"``: of ``metric(output)`` if
        given, else of the output if it is a scalar (``return_type="loss"``), else of the
        mean next-token loss (``.grad`` of the parameters accumulates as in any backward
        pass). ``remove_batch_dim`` drops the batch axis of the cached activations only;
        ``pos_slice`` cuts their position axis (see this module's docstring);
        ``reset_hooks_end=False`` leaves the caching hooks attached, storing later runs
        into the same cache, until ``reset_hooks()``.

        >>> logits, cache = model.run_with_cache(tokens, names_filter=lambda n: "pattern" in n)
        """
        if not model_args:
            raise TypeError("run_with_cache needs the model's input: token ids or text")
        input, *rest = model_args
        tokens = self.input_tokens(input, model_kwargs.pop("prepend_bos", None), model_kwargs.pop("padding_side", None))
        if remove_batch_dim and tokens.shape[0] != 1:
            raise ValueError(f"remove_batch_dim needs a batch of 1, got {tokens.shape[0]}")
        store, fwd_hooks, bwd_hooks = self.get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim, pos_slice=pos_slice
        )
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            if incl_bwd:
                with torch.enable_grad():
                    out = self(tokens, *rest, **model_kwargs)
                    if metric is not None:
                        value = metric(out)
                    elif isinstance(out, torch.Tensor) and out.dim() == 0:
                        value = out
                    else:
                        value = next_token_loss(out, tokens)
                    if value.dim() != 0:
                        raise ValueError(f"metric must return a scalar, got shape {tuple(value.shape)}")
                    value.backward()
            else:
                out = self(tokens, *rest, **model_kwargs)
        # Forward order of hook names, then their gradients (backward hooks fire in reverse).
        # Reordered in place: hooks left attached (reset_hooks_end=False) keep filling this dict.
        order = [*self.hook_dict, *(name + "_grad" for name in self.hook_dict)]
        ordered = {key: store[key] for key in order if key in store}
        store.clear()
        store.update(ordered)
        if not return_cache_object:
            return out, store
        return out, ActivationCache(store, self, has_batch_dim=not remove_batch_dim)
