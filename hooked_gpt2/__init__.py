"""hooked-gpt2: a GPT-2 you can train from scratch and take apart."""

from . import utils
from .cache import ActivationCache
from .checkpoint import CheckpointError
from .config import ConfigError, GPT2Config
from .factored_matrix import FactoredMatrix
from .hook_points import HookError, HookPoint
from .memory import keep_freed_memory
from .model import HookedGPT2
from .tokenizer import EOT_TOKEN, get_tokenizer

__version__ = "0.1.0"
__all__ = [
    "ActivationCache",
    "CheckpointError",
    "ConfigError",
    "EOT_TOKEN",
    "FactoredMatrix",
    "GPT2Config",
    "HookError",
    "HookPoint",
    "HookedGPT2",
    "get_tokenizer",
    "keep_freed_memory",
    "utils",
]
