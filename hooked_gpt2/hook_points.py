"""Hook points: identity modules on every activation worth reading, named by module path.

A hook is ``fn(activation, hook) -> tensor | None``; returning a tensor replaces the
activation downstream. Backward hooks get the gradient of the activation instead. What a
hook returns is checked: None (unchanged) or a tensor of exactly the activation's shape,
which is cast to the activation's dtype and device if it has others; anything else
raises ``HookOutputError`` naming the hook point, the shape expected and what came back
(a wrong shape would otherwise broadcast into wrong numbers, or fail deep inside torch).
Hooks are attached only for the length of a ``with model.hooks(...)`` block, and are
removed in ``finally`` even when the run raises; TransformerLens's ways of leaving them
on (``add_hook``, ``reset_hooks_end=False``) are there too, undone by ``reset_hooks()``.

Some activations (the attention pattern and scores, the layer norms' scale, each head's
result) are computed only when something reads them: ``has_hooks()``. That is a torch
hook attached here, or an nnsight trace waiting for this hook point's value or
caching it: nnsight wraps a module's ``forward`` instead of registering hooks
(``nnsight_wants``), so without asking it a plain trace would run the fused path and
the pattern would never exist.
"""

import contextlib
import difflib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]
NameFilter = None | str | Sequence[str] | Callable[[str], bool]


class HookError(KeyError):
    """An unknown hook name or a malformed hook specification."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0])


class HookOutputError(ValueError):
    """A hook returned something other than None or a tensor of its activation's shape."""


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"a {type(value).__name__} ({text[:60] + '...' if len(text) > 60 else text})"


def checked_output(returned, activation: torch.Tensor, hook: "HookPoint", fn, direction: str):
    """What a hook returned, as the activation (or gradient) that replaces ``activation``."""
    if returned is None:
        return None
    if isinstance(returned, torch.Tensor) and returned.shape == activation.shape:
        if returned.dtype != activation.dtype or returned.device != activation.device:
            returned = returned.to(device=activation.device, dtype=activation.dtype)
        return returned
    what = "gradient" if direction == "bwd" else "activation"
    raise HookOutputError(
        f"the {'backward' if direction == 'bwd' else 'forward'} hook {getattr(fn, '__name__', repr(fn))} on "
        f"{hook.name or 'an unnamed hook point'} returned {_describe(returned)}; a hook must return None (to leave "
        f"the {what} unchanged) or a tensor of the {what}'s shape {tuple(activation.shape)}"
    )


class Handle(NamedTuple):
    """A hook added with ``add_hook``, as ``remove_hooks`` selects it."""

    handle: torch.utils.hooks.RemovableHandle
    direction: str  # "fwd" or "bwd"
    permanent: bool
    level: int | None  # the hooks() context that left it attached (reset_hooks_end=False), else None


# Where nnsight keeps its per-module state once it has wrapped a module (nnsight >= 0.5,
# intervention/source.py): routes to the interleavers of the traces that reach it.
NNSIGHT_STATE = "__nnsight__"


def nnsight_wants(hook_point: nn.Module) -> bool:
    """Whether a running nnsight trace reads, edits, skips or caches this hook point.

    Its workers park on the next location they ask for (in forward order, which nnsight
    enforces), and its caches subscribe to theirs before the run starts; either one
    here means the value must be computed. Outside a trace, or in a trace asking for
    other things, the fast path stays.
    """
    interleaver, _, locations = hook_point.__dict__[NNSIGHT_STATE].active()
    if interleaver is None:
        return False
    return any(location in interleaver.parked or location in interleaver.observers for location in locations)


class HookPoint(nn.Module):
    """Identity on its input; hooks attached to it can read or replace the activation."""

    def __init__(self):
        super().__init__()
        self.name: str = ""  # set by the root module, e.g. "blocks.0.attn.hook_pattern"
        self.ctx: dict = {}  # scratch space for hooks, as in TransformerLens
        self.handles: list[Handle] = []

    def has_hooks(self) -> bool:
        """Whether something will read this activation in this forward pass."""
        return bool(self._forward_hooks) or (NNSIGHT_STATE in self.__dict__ and nnsight_wants(self))

    def layer(self) -> int | None:
        """The block index in the name, or None outside the blocks."""
        parts = self.name.split(".")
        return int(parts[1]) if parts[0] == "blocks" else None

    def add_hook(
        self, fn: HookFn, dir: str = "fwd", is_permanent: bool = False, level: int | None = None,
        prepend: bool = False, *, direction: str | None = None,
    ) -> torch.utils.hooks.RemovableHandle:
        """Attach ``fn`` until ``remove_hooks`` / ``model.reset_hooks`` (which keep
        permanent hooks unless told otherwise); ``prepend`` runs it before the hooks
        already here; ``direction`` is another name for ``dir``. Prefer
        ``model.hooks(...)``, which removes what it adds."""
        dir = direction or dir
        handle = self._attach(fn, dir, prepend)
        self.handles.append(Handle(handle, dir, is_permanent, level))
        return handle

    def add_perma_hook(self, fn: HookFn, dir: str = "fwd") -> torch.utils.hooks.RemovableHandle:
        return self.add_hook(fn, dir=dir, is_permanent=True)

    def remove_hooks(self, dir: str = "both", including_permanent: bool = False, level: int | None = None) -> None:
        """Remove the hooks added with ``add_hook`` in direction ``dir`` ("fwd", "bwd" or
        "both"), permanent ones only if asked, and only those of ``level`` if given."""
        if dir not in ("fwd", "bwd", "both"):
            raise HookError(f"dir must be 'fwd', 'bwd' or 'both', got {dir!r}")
        kept = []
        for entry in self.handles:
            if (dir in ("both", entry.direction) and (including_permanent or not entry.permanent)
                    and (level is None or entry.level == level)):
                entry.handle.remove()
            else:
                kept.append(entry)
        self.handles = kept

    def clear_context(self) -> None:
        self.ctx.clear()

    def _attach(self, fn: HookFn, direction: str, prepend: bool = False) -> torch.utils.hooks.RemovableHandle:
        return attach(self, fn, direction, prepend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return self.name


def attach(hook_point: nn.Module, fn: HookFn, direction: str, prepend: bool = False) -> torch.utils.hooks.RemovableHandle:
    """Register ``fn`` on ``hook_point`` as a torch forward hook; works on TransformerLens's
    hook points too (those inside an SAE spliced into the model, ``hooked_gpt2.saes``)."""
    if direction == "fwd":

        def forward_hook(module, inputs, output):
            return checked_output(fn(output, hook_point), output, hook_point, fn, "fwd")

    elif direction == "bwd":
        # A tensor hook on the activation sees exactly its gradient and may replace it.
        # It goes on a fresh alias: hook points are identities, so one tensor can pass
        # through several (blocks.0.hook_resid_post is blocks.1.hook_resid_pre), and
        # hooks on one tensor run in registration order, not upstream after downstream.
        def forward_hook(module, inputs, output):
            if output.requires_grad:
                output = output.view_as(output)
                output.register_hook(lambda grad: checked_output(fn(grad, hook_point), grad, hook_point, fn, "bwd"))
                return output

    else:
        raise HookError(f"hook direction must be 'fwd' or 'bwd', got {direction!r}")
    return hook_point.register_forward_hook(forward_hook, prepend=prepend)


def is_hook_point(module: nn.Module) -> bool:
    """Ours, or TransformerLens's: an SAELens SAE spliced into the model brings its own."""
    tl_hook_points = sys.modules.get("transformer_lens.hook_points")  # imported if such an SAE exists
    return isinstance(module, HookPoint) or (tl_hook_points is not None and isinstance(module, tl_hook_points.HookPoint))


class HookedRootModule(nn.Module):
    """Gives a model ``hook_names``, ``hooks``, ``run_with_hooks`` over its HookPoints."""

    def setup_hooks(self) -> None:
        """Name every HookPoint by its module path; call at the end of ``__init__``."""
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if is_hook_point(module):
                module.name = name
                self.hook_dict[name] = module

    @property
    def mod_dict(self) -> dict[str, nn.Module]:
        return dict(self.named_modules())

    def hook_points(self):
        return self.hook_dict.values()

    def add_hook(
        self, name, hook: HookFn, dir: str = "fwd", is_permanent: bool = False, level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Attach ``hook`` until ``reset_hooks`` (or for good, with ``is_permanent``) to the
        hook point ``name``, or to every one a function of the name selects."""
        for hook_name in self.resolve_names(name):
            self.hook_dict[hook_name].add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def add_perma_hook(self, name, hook: HookFn, dir: str = "fwd") -> None:
        """``add_hook(..., is_permanent=True)``: ``reset_hooks()`` keeps it."""
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False,
                            level: int | None = None) -> None:
        """Remove the hooks added with ``add_hook`` (or left by ``reset_hooks_end=False``) in
        ``direction``, permanent ones only if asked, only those of ``level`` if given."""
        for hook_point in self.hook_dict.values():
            hook_point.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def clear_contexts(self) -> None:
        for hook_point in self.hook_dict.values():
            hook_point.clear_context()

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both", including_permanent: bool = False,
                    level: int | None = None) -> None:
        """Remove the hooks added with ``add_hook`` (permanent ones too, if asked), and
        empty every hook's ``ctx`` unless ``clear_contexts=False``."""
        if clear_contexts:
            self.clear_contexts()
        self.remove_all_hook_fns(direction, including_permanent, level)

    def hook_names(self) -> list[str]:
        """Every hook point's name, in the order the forward pass reaches them."""
        return list(self.hook_dict)

    def resolve_names(self, names: NameFilter) -> list[str]:
        """The hook names a filter selects; unknown names raise with the closest valid ones."""
        if names is None:
            return self.hook_names()
        if callable(names):
            return [name for name in self.hook_dict if names(name)]
        if isinstance(names, str):
            names = [names]
        for name in names:
            self.check_name(name)
        return list(names)

    def check_name(self, name: str) -> None:
        if name not in self.hook_dict:
            close = difflib.get_close_matches(name, self.hook_dict, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else "see model.hook_names()"
            raise HookError(f"unknown hook name {name!r}; {hint}")

    @contextlib.contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
        bwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator["HookedRootModule"]:
        """Attach hooks for the length of the block; they are removed even on error. With
        ``reset_hooks_end=False`` they stay, as TransformerLens's do, until ``reset_hooks()``;
        ``clear_contexts`` empties every hook's ``ctx`` when they are removed.

        >>> def print_shape(activation, hook):
        ...     print(hook.name, tuple(activation.shape))
        >>> with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", print_shape)]):
        ...     logits = model(model.to_tokens("Hello world"))
        blocks.0.hook_resid_post (1, 3, 128)
        """
        specs = [(direction, spec) for direction, group in (("fwd", fwd_hooks), ("bwd", bwd_hooks)) for spec in group]
        for _, spec in specs:  # every spec checked before any hook is attached
            if not (isinstance(spec, (tuple, list)) and len(spec) == 2):
                raise HookError(f"a hook is a (name_or_filter, fn) pair, got {spec!r}")
            self.resolve_names(spec[0])
        handles = []
        # Nested contexts count levels, as TransformerLens's do: hooks a context leaves
        # attached (reset_hooks_end=False) are removable by level, reset_hooks(level=...).
        self.context_level = getattr(self, "context_level", 0) + 1
        try:
            for direction, (name_or_filter, fn) in specs:
                for name in self.resolve_names(name_or_filter):
                    if reset_hooks_end:
                        handles.append(attach(self.hook_dict[name], fn, direction))
                    else:  # tracked by the hook point, so that reset_hooks() removes it
                        self.hook_dict[name].add_hook(fn, dir=direction, level=self.context_level)
            yield self
        finally:
            for handle in handles:
                handle.remove()
            if clear_contexts and reset_hooks_end:
                self.clear_contexts()
            self.context_level -= 1

    def run_with_hooks(self, *args, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True,
                       clear_contexts: bool = False, **kwargs):
        """Run the forward pass with hooks attached, then remove them (unless
        ``reset_hooks_end=False``: then ``reset_hooks()`` does).

        Backward hooks are registered on the activations of this run, so they fire when
        you later call ``.backward()`` on something computed from its output, even after
        they were removed (TransformerLens's would not fire; it warns instead).
        """
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks, reset_hooks_end=reset_hooks_end,
                        clear_contexts=clear_contexts):
            return self(*args, **kwargs)
