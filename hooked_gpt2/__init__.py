"""hooked-gpt2: a GPT-2 you can train from scratch and take apart.

The names below are imported on first use (PEP 562), so ``import hooked_gpt2.tokenizer``
or ``hooked_gpt2.atomic`` (as data preparation does) never imports torch.
"""

import importlib

__version__ = "0.1.0"

# public name -> the submodule that defines it (a submodule itself: "")
_EXPORTS = {
    "ActivationCache": "cache",
    "CheckpointError": "checkpoint",
    "ConfigError": "config",
    "EOT_TOKEN": "tokenizer",
    "FactoredMatrix": "factored_matrix",
    "GPT2Config": "config",
    "HookError": "hook_points",
    "HookOutputError": "hook_points",
    "HookPoint": "hook_points",
    "HookedGPT2": "model",
    "get_tokenizer": "tokenizer",
    "keep_freed_memory": "memory",
    "utils": "",  # ``from hooked_gpt2 import utils``, as from transformer_lens
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _EXPORTS[name]:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        value = importlib.import_module(f".{name}", __name__)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
