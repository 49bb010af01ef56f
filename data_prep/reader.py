"""Read prepared shards for training: validated, memory-mapped, resumable batches.

    dataset = TokenDataset("data/python-stdlib", "train")
    loader = BatchLoader(dataset, batch_size=8, seq_len=256, rank=rank, world_size=world_size)
    batch = loader.next_batch()          # [8, 257]: inputs batch[:, :-1], targets batch[:, 1:]
    state = loader.state_dict()          # save with the checkpoint; load_state_dict resumes exactly

A split is one token stream, its shards concatenated in order. Batches walk it as in
llm.c and nanoGPT: each step, rank r reads ``batch_size * seq_len + 1`` tokens starting
``r * batch_size * seq_len`` past a shared position, which then advances by
``batch_size * seq_len * world_size``; ranks never overlap and leave no gaps.

With an ``order_seed`` the loader reads the same sequences in a shuffled order instead:
the split is cut into ``(n_tokens - 1) // seq_len`` sequences of ``seq_len + 1`` tokens,
each epoch visits them in a permutation drawn from ``(order_seed, epoch)``, and the saved
position is the same as for the sequential order, so a resumed run continues exactly.
This is the data-order noise of a study, separate from the initialisation seed.
"""

import bisect
import json
from pathlib import Path

import numpy as np
import torch

from data_prep.shards import HEADER_BYTES, MANIFEST, TOKEN_DTYPE, file_sha256, read_header, shard_size
from hooked_gpt2.tokenizer import tokenizer_sha256

SPLITS = ("train", "val")


class ShardError(ValueError):
    """Prepared data that cannot be used as it is; the message names the file and the fix."""


def load_manifest(data_dir: Path) -> dict:
    path = data_dir / MANIFEST
    if not path.exists():
        raise ShardError(f"{path} does not exist: {data_dir} is not prepared data, or its preparation "
                         "did not finish; run python -m data_prep.prepare --source ... "
                         f"--out {data_dir} (re-running it completes an interrupted run)")
    try:
        manifest = json.loads(path.read_text())
        manifest["splits"], manifest["tokenizer"]["ranks_sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{path} is not a valid manifest ({exc}); prepare the data again with --force") from None
    if manifest["tokenizer"]["ranks_sha256"] != tokenizer_sha256():
        raise ShardError(f"{path}: the data was tokenised with another tokenizer "
                         f"(ranks sha256 {manifest['tokenizer']['ranks_sha256'][:12]}...); prepare it again")
    return manifest


def open_shard(path: Path, expected_tokens: int | None = None) -> np.memmap:
    """Memory-map one llm.c shard after checking its header and size against each other
    and, if given, against the manifest's token count."""
    if not path.exists():
        raise ShardError(f"{path} is missing; prepare the data again (re-run data_prep.prepare)")
    try:
        n_tokens = read_header(path)
    except ValueError as exc:
        raise ShardError(f"{exc}; prepare the data again with --force") from None
    if expected_tokens is not None and n_tokens != expected_tokens:
        raise ShardError(f"{path}: header says {n_tokens} tokens, manifest.json says {expected_tokens}; "
                         "the shard and manifest do not belong together; prepare the data again with --force")
    size = path.stat().st_size
    if size != shard_size(n_tokens):
        raise ShardError(f"{path}: {size} bytes, expected {shard_size(n_tokens)} for {n_tokens} tokens "
                         "(truncated or padded); prepare the data again with --force")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def manifest_vocab(manifest: dict) -> list[int] | None:
    """A compact vocabulary's GPT-2 id of each token id (``data_prep.compact``), or None for
    data in GPT-2's own ids."""
    return manifest.get("vocab", {}).get("ids")


class TokenDataset:
    """One split of prepared data as a single memory-mapped token stream.

    >>> ds = TokenDataset("data/python-stdlib", "val")      # doctest: +SKIP
    >>> ds.read(0, 3)                                       # doctest: +SKIP
    array([50256, ...], dtype=uint16)
    """

    def __init__(self, data_dir, split: str = "train", *, verify_sha256: bool = False):
        if split not in SPLITS:
            raise ShardError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        self.data_dir, self.split = Path(data_dir), split
        self.manifest = load_manifest(self.data_dir)
        entries = self.manifest["splits"].get(split, {}).get("shards", [])
        if not entries:
            raise ShardError(f"{self.data_dir / MANIFEST} has no {split!r} shards"
                             f"{' (prepared with --val-tokens 0)' if split == 'val' else ''}; "
                             "prepare the data again with a non-empty split")
        self.vocab = manifest_vocab(self.manifest)
        self.shards = []
        for entry in entries:
            path = self.data_dir / entry["file"]
            self.shards.append(open_shard(path, entry["tokens"]))
            if verify_sha256 and file_sha256(path) != entry["sha256"]:
                raise ShardError(f"{path}: sha256 differs from manifest.json (corrupted); "
                                 "prepare the data again with --force")
        # starts[i] is where shard i begins in the split's stream.
        self.starts = np.cumsum([0] + [len(s) for s in self.shards]).tolist()
        self.n_tokens = self.starts[-1]
        if self.n_tokens != self.manifest["splits"][split]["tokens"]:
            raise ShardError(f"{self.data_dir / MANIFEST}: shards hold {self.n_tokens} {split} tokens, "
                             f"the manifest says {self.manifest['splits'][split]['tokens']}; prepare again with --force")

    def __len__(self) -> int:
        return self.n_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream as int64, across shard boundaries."""
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside the stream of {self.n_tokens}")
        out = np.empty(length, dtype=np.int64)
        i = bisect.bisect_right(self.starts, start) - 1
        done = 0
        while done < length:
            offset = start + done - self.starts[i]
            take = min(length - done, len(self.shards[i]) - offset)
            out[done : done + take] = self.shards[i][offset : offset + take]
            done += take
            i += 1
        return out


class BatchLoader:
    """Deterministic batches of ``[batch_size, seq_len + 1]`` tokens for one DDP rank.

    Row i of a batch is ``tokens[start + i*seq_len : start + (i+1)*seq_len + 1]``, so
    one batch of 2B rows equals two consecutive batches of B rows, and equals rank 0's
    B rows over rank 1's with ``world_size=2``. When the next step would run past the
    end of the stream, every rank wraps to the start together and ``epoch`` counts up.

    With ``order_seed`` set, row i is sequence ``perm[pos // seq_len + i]`` of the epoch's
    permutation (the same composition rules hold, over the permuted sequences).

    >>> loader = BatchLoader(ds, 8, 256, order_seed=5)     # doctest: +SKIP
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, *,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False, order_seed: int | None = None):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.dataset, self.batch_size, self.seq_len = dataset, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.pin_memory = pin_memory  # page-locked batches, so a copy to the GPU with non_blocking=True is asynchronous
        self.tokens_per_rank = batch_size * seq_len
        self.step_tokens = self.tokens_per_rank * world_size
        self.order_seed = order_seed
        self._permutation: tuple[int, np.ndarray] | None = None  # (epoch, its order), drawn once per epoch
        if dataset.n_tokens < self.step_tokens + 1:
            raise ShardError(
                f"{dataset.data_dir} {dataset.split!r} split has {dataset.n_tokens} tokens, fewer than the "
                f"{self.step_tokens + 1} one step needs (batch_size {batch_size} x seq_len {seq_len} x "
                f"world_size {world_size} + 1); use a smaller batch or sequence, or prepare more data")
        self.reset()

    def reset(self) -> None:
        """Back to the start of the stream (for the same validation batches every time)."""
        self.pos, self.epoch = 0, 0

    def next_batch(self) -> torch.Tensor:
        # All ranks test the same condition, so they wrap on the same step.
        if self.pos + self.step_tokens + 1 > self.dataset.n_tokens:
            self.pos, self.epoch = 0, self.epoch + 1
        start = self.pos + self.rank * self.tokens_per_rank
        if self.order_seed is None:
            flat = torch.from_numpy(self.dataset.read(start, self.tokens_per_rank + 1))
            # Windows of seq_len + 1 that overlap by one token: row i's last token is row i+1's first.
            windows = flat.unfold(0, self.seq_len + 1, self.seq_len)
        else:
            first = start // self.seq_len
            rows = self.permutation()[first : first + self.batch_size]
            windows = torch.from_numpy(np.stack([self.dataset.read(int(r) * self.seq_len, self.seq_len + 1) for r in rows]))
        self.pos += self.step_tokens
        # A fresh buffer per batch: the previous one may still be copying to the GPU.
        return torch.empty(windows.shape, dtype=windows.dtype, pin_memory=self.pin_memory).copy_(windows)

    def permutation(self) -> np.ndarray:
        """This epoch's order of the split's sequences (for ``order_seed`` set)."""
        if self._permutation is None or self._permutation[0] != self.epoch:
            n_sequences = (self.dataset.n_tokens - 1) // self.seq_len
            rng = np.random.default_rng([self.order_seed, self.epoch])
            self._permutation = (self.epoch, rng.permutation(n_sequences))
        return self._permutation[1]

    def state_dict(self) -> dict:
        state = {"pos": self.pos, "epoch": self.epoch, "n_tokens": self.dataset.n_tokens}
        return state if self.order_seed is None else {**state, "order_seed": self.order_seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n_tokens"] != self.dataset.n_tokens:
            raise ShardError(f"the saved loader position is for a stream of {state['n_tokens']} tokens, "
                             f"but {self.dataset.data_dir} {self.dataset.split!r} has {self.dataset.n_tokens}; "
                             "resume with the data the run started with")
        if state.get("order_seed") != self.order_seed:
            raise ShardError(f"the saved loader position is for data order seed {state.get('order_seed')}, this run "
                             f"reads with {self.order_seed}; resume with the data order the run started with")
        if not 0 <= state["pos"] <= self.dataset.n_tokens:
            raise ValueError(f"saved position {state['pos']} is outside the stream of {self.dataset.n_tokens} tokens")
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])
