"""Hook points: identity modules on every activation worth reading, named by module path.

A hook is ``fn(activation, hook) -> tensor | None``; returning a tensor replaces the
activation downstream. Backward hooks get the gradient of the activation instead. What a
hook returns is checked: None (unchanged) or a tensor of exactly the activation's shape,
which is cast to the activation's dtype and device if it has others; anything else
raises ``HookOutputError`` naming the hook point, the shape expected and what came back
(a wrong shape would otherwise broadcast into wrong numbers, or fail deep inside torch).
Hooks are attached only for the length of a ``with model.hooks(...)`` block, and are
removed in ``finally`` even when the run raises.
"""

import contextlib
import difflib
from collections.abc import Callable, Iterator, Sequence

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


class HookPoint(nn.Module):
    """Identity on its input; hooks attached to it can read or replace the activation."""

    def __init__(self):
        super().__init__()
        self.name: str = ""  # set by the root module, e.g. "blocks.0.attn.hook_pattern"
        self.ctx: dict = {}  # scratch space for hooks, as in TransformerLens
        self.handles: list[tuple[torch.utils.hooks.RemovableHandle, bool]] = []  # (handle, permanent)

    def has_hooks(self) -> bool:
        return bool(self._forward_hooks)

    def layer(self) -> int | None:
        """The block index in the name, or None outside the blocks."""
        parts = self.name.split(".")
        return int(parts[1]) if parts[0] == "blocks" else None

    def add_hook(
        self, fn: HookFn, direction: str = "fwd", dir: str | None = None, is_permanent: bool = False
    ) -> torch.utils.hooks.RemovableHandle:
        """Attach ``fn`` (``dir`` is TransformerLens's name for ``direction``). Prefer
        ``model.hooks(...)``, which removes it; ``remove_hooks`` / ``model.reset_hooks``
        remove hooks added here, keeping permanent ones unless told otherwise."""
        handle = self._attach(fn, dir or direction)
        self.handles.append((handle, is_permanent))
        return handle

    def remove_hooks(self, including_permanent: bool = False) -> None:
        for handle, permanent in self.handles:
            if including_permanent or not permanent:
                handle.remove()
        self.handles = [(h, p) for h, p in self.handles if p and not including_permanent]
        if including_permanent:
            self.ctx.clear()

    def _attach(self, fn: HookFn, direction: str) -> torch.utils.hooks.RemovableHandle:
        if direction == "fwd":

            def forward_hook(module, inputs, output):
                return checked_output(fn(output, self), output, self, fn, "fwd")

        elif direction == "bwd":
            # A tensor hook on the activation sees exactly its gradient and may replace it.
            # It goes on a fresh alias: hook points are identities, so one tensor can pass
            # through several (blocks.0.hook_resid_post is blocks.1.hook_resid_pre), and
            # hooks on one tensor run in registration order, not upstream after downstream.
            def forward_hook(module, inputs, output):
                if output.requires_grad:
                    output = output.view_as(output)
                    output.register_hook(lambda grad: checked_output(fn(grad, self), grad, self, fn, "bwd"))
                    return output

        else:
            raise HookError(f"hook direction must be 'fwd' or 'bwd', got {direction!r}")
        return self.register_forward_hook(forward_hook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return self.name


class HookedRootModule(nn.Module):
    """Gives a model ``hook_names``, ``hooks``, ``run_with_hooks`` over its HookPoints."""

    def setup_hooks(self) -> None:
        """Name every HookPoint by its module path; call at the end of ``__init__``."""
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    @property
    def mod_dict(self) -> dict[str, nn.Module]:
        return dict(self.named_modules())

    def hook_points(self):
        return self.hook_dict.values()

    def add_hook(self, name, hook: HookFn, dir: str = "fwd", is_permanent: bool = False) -> None:
        """Attach ``hook`` until ``reset_hooks`` (or for good, with ``is_permanent``) to the
        hook point ``name``, or to every one a function of the name selects."""
        for hook_name in self.resolve_names(name):
            self.hook_dict[hook_name].add_hook(hook, dir=dir, is_permanent=is_permanent)

    def add_perma_hook(self, name, hook: HookFn, dir: str = "fwd") -> None:
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both", including_permanent: bool = False) -> None:
        """Remove the hooks added with ``add_hook`` (permanent ones too, if asked)."""
        for hook_point in self.hook_dict.values():
            hook_point.remove_hooks(including_permanent)
            if clear_contexts:
                hook_point.ctx.clear()

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
    ) -> Iterator["HookedRootModule"]:
        """Attach hooks for the length of the block; they are removed even on error.

        >>> def print_shape(activation, hook):
        ...     print(hook.name, tuple(activation.shape))
        >>> with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", print_shape)]):
        ...     logits = model(model.to_tokens("Hello world"))
        blocks.0.hook_resid_post (1, 3, 128)
        """
        handles = []
        try:
            for direction, specs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for spec in specs:
                    if not (isinstance(spec, (tuple, list)) and len(spec) == 2):
                        raise HookError(f"a hook is a (name_or_filter, fn) pair, got {spec!r}")
                    name_or_filter, fn = spec
                    for name in self.resolve_names(name_or_filter):
                        handles.append(self.hook_dict[name]._attach(fn, direction))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def run_with_hooks(self, *args, fwd_hooks=(), bwd_hooks=(), **kwargs):
        """Run the forward pass with hooks attached, then remove them.

        Backward hooks are registered on the activations of this run, so they fire when
        you later call ``.backward()`` on something computed from its output.
        """
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
            return self(*args, **kwargs)
