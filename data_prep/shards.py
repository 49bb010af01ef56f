"""Token shards in llm.c's ``.bin`` layout, written so that a crash never leaves a
shard that looks complete but is not.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token
count, then zeros) followed by the tokens as little-endian uint16. The same layout as
llm.c's ``dev/data/data_common.py``, so its tooling can read our shards and we theirs.
"""

import concurrent.futures
import hashlib
import os
import re
import time
from pathlib import Path

import numpy as np

from hooked_gpt2.atomic import atomic_path, temporary_path

MAGIC = 20240520
VERSION = 1
HEADER_INT32 = 256
HEADER_BYTES = HEADER_INT32 * 4
TOKEN_DTYPE = np.dtype("<u2")
# The token count lives in an int32 header field.
MAX_SHARD_TOKENS = 2**31 - 1
SHARD_NAME = re.compile(r"^(train|val)_(\d{6})\.bin$")
MANIFEST = "manifest.json"  # written last: its presence marks the output complete
# Test-only: seconds to sleep between writing a shard's temporary file and renaming it,
# so a test can kill the process at the worst moment. Never set it otherwise.
_DELAY_ENV = "HOOKED_GPT2_PREP_TEST_DELAY"


def shard_name(split: str, index: int) -> str:
    """``train_000000.bin``: llm.c's naming, sorted order is stream order."""
    return f"{split}_{index:06d}.bin"


def shard_size(n_tokens: int) -> int:
    """Bytes a shard of ``n_tokens`` tokens occupies on disk."""
    return HEADER_BYTES + n_tokens * TOKEN_DTYPE.itemsize


def make_header(n_tokens: int) -> np.ndarray:
    header = np.zeros(HEADER_INT32, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, n_tokens
    return header


def read_header(path: Path) -> int:
    """The token count in ``path``'s header; ValueError naming the file if it is not a shard."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"{path}: {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != MAGIC:
        raise ValueError(f"{path}: magic number {header[0]}, expected {MAGIC}; not a token shard")
    if header[1] != VERSION:
        raise ValueError(f"{path}: shard version {header[1]}, this reader knows version {VERSION}")
    return int(header[2])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: Path, tokens: np.ndarray) -> str:
    """Write ``tokens`` to ``path`` atomically and return the file's sha256.

    A shard under its final name is always complete. If ``path`` already holds exactly
    these bytes (a resumed run), it is left alone.
    """
    header = make_header(len(tokens))
    tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
    if path.exists() and path.stat().st_size == shard_size(len(tokens)):
        sha = tokens_sha256(header, tokens)
        if file_sha256(path) == sha:
            return sha
    # Hash in a thread while the bytes are written and flushed to disk: hashlib and
    # the file calls both release the GIL, so the two overlap.
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        sha = executor.submit(tokens_sha256, header, tokens)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(header.tobytes())
                f.write(memoryview(tokens).cast("B"))
            if os.environ.get(_DELAY_ENV):
                time.sleep(float(os.environ[_DELAY_ENV]))
        return sha.result()


def tokens_sha256(header: np.ndarray, tokens: np.ndarray) -> str:
    """The sha256 of the shard file that ``header`` and ``tokens`` make."""
    digest = hashlib.sha256(header.tobytes())
    digest.update(memoryview(tokens).cast("B"))
    return digest.hexdigest()


def remove_temporaries(out_dir: Path) -> None:
    """Delete half-written shards (and manifest) that an interrupted run left behind."""
    for path in [*out_dir.glob(temporary_path("*.bin").name), temporary_path(out_dir / MANIFEST)]:
        path.unlink(missing_ok=True)


def remove_shards_except(out_dir: Path, keep: set[str]) -> list[str]:
    """Delete shard files not in ``keep`` (left over from a run with more shards)."""
    removed = []
    for path in sorted(out_dir.iterdir()):
        if SHARD_NAME.match(path.name) and path.name not in keep:
            path.unlink()
            removed.append(path.name)
    return removed


class ShardWriter:
    """Cuts one split's token stream into shards of ``shard_tokens`` tokens.

    Shards cut across documents, as in llm.c: readers see the split as one stream.
    """

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        # np.empty only reserves address space; pages are touched as tokens arrive.
        self.buffer = np.empty(shard_tokens, dtype=TOKEN_DTYPE)
        self.fill = 0
        self.tokens = 0
        self.documents = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self.fill)
            self.buffer[self.fill : self.fill + take] = tokens[:take]
            self.fill += take
            self.tokens += take
            tokens = tokens[take:]
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.fill:
            return
        name = shard_name(self.split, len(self.shards))
        sha = write_shard(self.out_dir / name, self.buffer[: self.fill])
        self.shards.append({"file": name, "tokens": self.fill, "sha256": sha})
        self.fill = 0
