"""Atomic file and directory writes: the one place that writes a temporary, flushes it
to disk and renames it into place.

Whatever moment a process dies, a file or directory under its final name is whole: the
old version or the new one, never half of either. Torch-free, so data preparation uses
it without importing torch.

>>> atomic_write("/tmp/example.json", '{"step": 1}\\n')  # doctest: +SKIP
"""

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temporary_path(path: str | Path) -> Path:
    """Where ``path`` is written before its rename: ``.NAME.tmp`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to (a file, or a directory
    for a checkpoint); on leaving, flush it to disk and rename it to ``path``, replacing
    what was there. On an error the temporary is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temporary_path(path)
    _remove(tmp)
    try:
        yield tmp
        _fsync_tree(tmp)
        if tmp.is_dir() and path.exists():  # a directory cannot be replaced in one rename
            old = path.with_name(f".{path.name}.old{TMP_SUFFIX}")
            _remove(old)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync(path.parent)  # make the rename itself durable


def current_umask() -> int:
    """The process's umask (reading it means setting it: put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: str | bytes | Iterable) -> None:
    """Write ``data`` (text, bytes, or an iterable of bytes-like parts) to ``path`` atomically."""
    if isinstance(data, str):
        data = data.encode()
    parts = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for part in parts:
            f.write(part)


def _fsync_tree(path: Path) -> None:
    for p in [*sorted(path.rglob("*")), path] if path.is_dir() else [path]:
        _fsync(p)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
