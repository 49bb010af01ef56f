"""Command-line pieces the analysis scripts share: the common flags, loading a
checkpoint, and turning user errors into ``error: ...`` with exit code 2."""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from hooked_gpt2 import CheckpointError, HookError, HookedGPT2
from hooked_gpt2.atomic import atomic_write
from hooked_gpt2.checkpoint import FORMAT
from hooked_gpt2.device import resolve_device
from hooked_gpt2.memory import keep_freed_memory

from .common import AnalysisError

# ValueError covers our AnalysisError, CheckpointError and ConfigError, and the model's own
# checks on token ids and lengths, whose messages are written for users.
USER_ERRORS = (ValueError, HookError)
DEVICE_HELP = "auto (a CUDA GPU if there is one, else the CPU; the default, as in training), cpu, cuda or cuda:N"


def parser(module: str, description: str, prompt: bool = True) -> argparse.ArgumentParser:
    """An argument parser for ``python -m <module>`` with ``--checkpoint``, ``--out`` and
    (optionally) ``--prompt``."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (save_pretrained output or a Hugging Face GPT-2 directory)")
    p.add_argument("--out", required=True, help="directory to write report.html and results.json into")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    if prompt:
        p.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog. The quick brown fox",
                       help="text to analyse (a BOS token is prepended)")
    return p


def load_model(path: str | Path, device: str = "auto") -> HookedGPT2:
    """A hooked-gpt2 checkpoint, or a Hugging Face GPT-2 directory through ``from_hf``."""
    path = Path(path)
    config = path / "config.json"
    is_ours = True
    if config.is_file():
        try:
            is_ours = json.loads(config.read_text()).get("format") == FORMAT
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            is_ours = True  # let from_pretrained report the damaged file
    if is_ours:
        model = HookedGPT2.from_pretrained(path)
    else:
        try:
            model = HookedGPT2.from_hf(path)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot load {path} as a Hugging Face GPT-2: {e}") from None
    try:
        return model.to(resolve_device(device)).eval()
    except RuntimeError as e:
        raise AnalysisError(f"cannot use device {device!r}: {e}") from None


def out_dir(path: str | Path) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=1) + "\n")


def finish(out: Path, save_page: Callable[[Path], Path], results: dict, html: str = "report.html",
           data: str = "results.json") -> int:
    """The end of every analysis script: the page (``save_page(path)``, e.g. ``page.save``)
    and the results (JSON) written into ``out``, and where they are printed. Returns the
    exit code, 0."""
    path = save_page(out / html)
    write_json(out / data, results)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {out / data}")
    return 0


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Call ``main(argv)``; user errors print ``error: ...`` and exit 2, without a traceback."""
    keep_freed_memory()  # the scripts' 50k-vocabulary logits: reuse memory rather than re-zero it
    try:
        code = main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
