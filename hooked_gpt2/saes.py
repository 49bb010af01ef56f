"""SAELens's model-side API (``HookedSAETransformer``'s) on our model: splice trained
sparse autoencoders into hook points, with the same names and semantics.

``add_sae(sae)`` puts a ``SplicedSAE`` in place of the hook point ``sae.cfg.metadata.hook_name``:
the activation that reaches it is replaced by the SAE's reconstruction (with
``use_error_term``, by the reconstruction plus the SAE's error, so that the model's
output is unchanged while edits of the SAE's features still act). The SAE's own hook
points (``hook_sae_input``, ``hook_sae_acts_pre``, ``hook_sae_acts_post``,
``hook_sae_recons``, ``hook_sae_error``, ``hook_sae_output``) join the model's, named
under the spliced path (``blocks.0.hook_resid_pre.hook_sae_acts_post``), so
``run_with_cache`` caches them and ``run_with_hooks`` reaches them. The hook point the SAE
replaces is not hookable while it is there (its name raises, pointing at the SAE's);
``reset_saes`` puts back that very hook point object, with whatever hooks it had.

The SAE runs as it is (its own ``encode`` and ``decode``); its parameters are not the
model's (``model.parameters()`` leaves them out, as SAELens does). The error term is kept
on the splice, not set on the SAE (SAELens deprecates ``sae.use_error_term = ...``).

>>> from sae_lens import SAE  # doctest: +SKIP
>>> logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])  # doctest: +SKIP
>>> cache["blocks.0.hook_resid_pre.hook_sae_acts_post"].shape  # doctest: +SKIP
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .hook_points import HookError


class SplicedSAE(nn.Module):
    """An SAE in the place of a hook point; its hook points are this module's children."""

    def __init__(self, sae, original: nn.Module, use_error_term: bool):
        super().__init__()
        # Kept out of the module tree: the SAE's parameters are not the model's, and its
        # hook points are registered below, directly under the spliced path.
        self.__dict__["sae"] = sae
        self.__dict__["original"] = original
        for name, hook_point in sae.hook_dict.items():
            self.add_module(name, hook_point)
        self.use_error_term = use_error_term

    def has_hooks(self) -> bool:
        # Where an activation is computed only when hooked (hook_pattern, hook_result,
        # a layer norm's hook_scale), an SAE there needs it computed.
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The SAE's reconstruction; with the error term, plus ``x`` minus the reconstruction
        an unhooked SAE makes (so hooks that edit its features change the output, and the
        output is ``x`` when none do), as SAELens's ``SAE.forward`` computes it."""
        out = self.sae.decode(self.sae.encode(x))
        if self.use_error_term:
            with torch.no_grad():
                with hooks_off(self.sae.hook_dict.values()):
                    clean = self.sae.decode(self.sae.encode(x))
                out = out + self.sae.hook_sae_error(x - clean)
        return self.sae.hook_sae_output(out)

    def extra_repr(self) -> str:
        return f"{type(self.sae).__name__} at {self.original.name}, use_error_term={self.use_error_term}"


@contextlib.contextmanager
def hooks_off(hook_points) -> Iterator[None]:
    """Detach the forward hooks of ``hook_points`` for the block, then put them back."""
    saved = [(hook_point, dict(hook_point._forward_hooks)) for hook_point in hook_points]
    for hook_point, _ in saved:
        hook_point._forward_hooks.clear()
    try:
        yield
    finally:
        for hook_point, hooks in saved:
            hook_point._forward_hooks.update(hooks)


def hook_name_of(sae) -> str:
    try:
        metadata = sae.cfg.metadata
    except AttributeError:
        raise TypeError(f"expected an SAELens SAE (with cfg.metadata.hook_name), got {type(sae).__name__}") from None
    if getattr(metadata, "hook_name_out", None) not in (None, metadata.hook_name):
        raise ValueError(
            f"this SAE reads {metadata.hook_name} and writes {metadata.hook_name_out} (a transcoder); only SAEs "
            "that reconstruct the activation they read can be spliced here"
        )
    if not isinstance(metadata.hook_name, str):
        raise ValueError(f"this SAE's cfg.metadata.hook_name is {metadata.hook_name!r}: set it to the hook point "
                         "whose activations it was trained on (SAELens sets it when training ends)")
    return metadata.hook_name


class SAEMixin:
    """``add_sae``, ``reset_saes``, ``saes()``, ``run_with_saes``, ``run_with_cache_with_saes``,
    ``run_with_hooks_with_saes`` and ``acts_to_saes``, as SAELens's ``HookedSAETransformer``."""

    @property
    def acts_to_saes(self) -> dict:
        """The SAEs spliced in, by the hook name they replace."""
        return {name: splice.sae for name, splice in self._splices().items()}

    def _splices(self) -> dict[str, SplicedSAE]:
        return {splice.original.name: splice for splice in self.modules() if isinstance(splice, SplicedSAE)}

    def check_name(self, name: str) -> None:
        if name not in self.hook_dict and name in self._splices():
            raise HookError(
                f"an SAE is spliced into {name}, so it is not a hook point until reset_saes(); hook the SAE's own "
                f"({name}.hook_sae_input, {name}.hook_sae_acts_post, {name}.hook_sae_output, ...)"
            )
        super().check_name(name)

    def add_sae(self, sae, use_error_term: bool | None = None, exclude_special_tokens=False) -> None:
        """Splice ``sae`` into its hook point (``sae.cfg.metadata.hook_name``) until
        ``reset_saes``, replacing an SAE already there. ``use_error_term`` (default: the
        SAE's own setting) adds the SAE's error back, so the model computes what it would
        without the SAE, while edits of the SAE's activations still act.

        >>> model.add_sae(sae)  # doctest: +SKIP
        >>> logits = model(tokens)  # doctest: +SKIP
        >>> model.reset_saes()  # doctest: +SKIP
        """
        if exclude_special_tokens is not False:
            raise ValueError("exclude_special_tokens is not supported here: an SAE applies at every position")
        name = hook_name_of(sae)
        splices = self._splices()
        if name in splices:  # replaced below, once everything is checked
            original = splices[name].original
        else:
            if name not in self.hook_dict:
                self.check_name(name)  # raises with the closest names
            original = self.hook_dict[name]
            if ".hook_sae_" in name:
                raise HookError(f"{name} is an SAE's own hook point; splice SAEs into the model's hook points")
        if original._forward_hooks:
            raise HookError(
                f"{name} has hooks attached, which would not run while an SAE replaces it: remove them first "
                f"(model.reset_hooks()), or attach them to {name}.hook_sae_input / {name}.hook_sae_output"
            )
        error_term = sae.use_error_term if use_error_term is None else use_error_term
        if name in splices:
            self._reset_sae(name)
        parent, _, attribute = name.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, attribute, SplicedSAE(sae, original, error_term))
        self.setup_hooks()

    def _reset_sae(self, name: str) -> None:
        splice = self._splices()[name]
        parent, _, attribute = name.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, attribute, splice.original)
        splice.sae.setup()  # its hook points named as the SAE names them again
        self.setup_hooks()

    def reset_saes(self, act_names: str | list[str] | None = None) -> None:
        """Remove the SAEs at ``act_names`` (all, by default), putting back the hook points
        they replaced: the same objects, with their hooks and ``ctx``."""
        splices = self._splices()
        names = list(splices) if act_names is None else [act_names] if isinstance(act_names, str) else act_names
        for name in names:
            if name not in splices:
                raise HookError(f"no SAE is spliced into {name!r}; SAEs are at: {', '.join(splices) or 'none'}")
            self._reset_sae(name)

    @contextlib.contextmanager
    def saes(self, saes=(), reset_saes_end: bool = True, use_error_term: bool | None = None,
             exclude_special_tokens=False) -> Iterator:
        """Splice ``saes`` (one or a list) for the length of the block; on leaving it (even
        on error), remove them and put back any SAE they displaced, as it was.

        >>> with model.saes(saes=[sae]):  # doctest: +SKIP
        ...     logits, cache = model.run_with_cache(tokens)
        """
        saes = [saes] if not isinstance(saes, (list, tuple)) else list(saes)
        displaced = []
        try:
            for sae in saes:
                name = hook_name_of(sae)
                displaced.append((name, self._splices().get(name)))
                self.add_sae(sae, use_error_term=use_error_term, exclude_special_tokens=exclude_special_tokens)
            yield self
        finally:
            if reset_saes_end:
                for name, previous in reversed(displaced):
                    if name in self._splices():
                        self._reset_sae(name)
                    if previous is not None:
                        self.add_sae(previous.sae, use_error_term=previous.use_error_term)

    def run_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True, use_error_term: bool | None = None,
                      exclude_special_tokens=False, **model_kwargs):
        """The forward pass with ``saes`` spliced in for this run."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None, exclude_special_tokens=False,
                                 return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs):
        """``run_with_cache`` with ``saes`` spliced in: the cache holds the SAEs' activations
        too (``<hook name>.hook_sae_acts_post``, ...)."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self.run_with_cache(*model_args, return_cache_object=return_cache_object,
                                       remove_batch_dim=remove_batch_dim, **kwargs)

    def run_with_hooks_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True,
                                 exclude_special_tokens=False, fwd_hooks=(), bwd_hooks=(),
                                 reset_hooks_end: bool = True, clear_contexts: bool = False, **model_kwargs):
        """``run_with_hooks`` with ``saes`` spliced in; hooks may name the SAEs' hook points."""
        with self.saes(saes, reset_saes_end, exclude_special_tokens=exclude_special_tokens):
            return self.run_with_hooks(*model_args, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks,
                                       reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts, **model_kwargs)
