"""A compact vocabulary: prepared data rewritten over its most frequent tokens.

    python -m data_prep.compact data/python-stdlib --vocab-size 2048 --out data/python-stdlib-v2048

The output keeps the source's documents, splits and shard layout, but its token ids are
those of a ``vocab_size``-token vocabulary: id ``i`` is the ``i``-th most frequent GPT-2
token of the training split (``<|endoftext|>`` always among them), and the last id stands
for every other token. ``manifest.json`` lists the GPT-2 id of each (``vocab.ids``, -1 for
the catch-all) and how much of each split the catch-all covers. A model trained on it
(``training.train`` reads the vocabulary from the manifest) has ``d_vocab = vocab_size``
and ``cfg.vocab`` set, so it still reads and writes text (``model.to_tokens``,
``generate``) and the analyses work as on GPT-2's ids.

Why: on a CPU a small model's step costs what its unembedding costs, and GPT-2's is 50,257
wide. Over 1,024 tokens the demo's fp32 step takes about 17 ms instead of about 450 ms
(2 threads; ``docs/induction-recipe.md``), which turns a study of 30 runs in which an
induction head forms from hours into about 20 minutes
(``docs/studies/interventions_circuits.md``). Losses over a compact vocabulary are not
comparable with losses over GPT-2's: the catch-all id is one easy prediction for many
rare tokens.

The rewrite is atomic shard by shard and ``manifest.json`` comes last, as in
``data_prep.prepare``; re-running the same command over finished output does nothing.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

from data_prep.reader import SPLITS, ShardError, TokenDataset
from data_prep.shards import MANIFEST, remove_shards_except, remove_temporaries, write_shard
from data_prep.sources import DataPrepError
from hooked_gpt2.atomic import atomic_write
from hooked_gpt2.tokenizer import D_VOCAB, EOT_TOKEN, OTHER, compact_table

MIN_VOCAB = 16


def token_counts(dataset: TokenDataset) -> np.ndarray:
    """How often each of the 65,536 uint16 ids occurs in ``dataset`` (one split)."""
    counts = np.zeros(65536, dtype=np.int64)
    for shard in dataset.shards:
        counts += np.bincount(shard, minlength=65536)
    return counts


def most_frequent(counts: np.ndarray, k: int, exclude: int | None = None) -> list[int]:
    """The ``k`` most frequent ids with a non-zero count (fewer if fewer occur), most
    frequent first, ties by id; never ``exclude``."""
    if exclude is not None:
        counts = counts.copy()
        counts[exclude] = 0
    order = np.argsort(-counts, kind="stable")[: min(k, int((counts > 0).sum()))]
    return [int(i) for i in order]


def choose_vocab(counts: np.ndarray, vocab_size: int) -> list[int]:
    """The compact vocabulary of a training split with token ``counts``: its
    ``vocab_size - 1`` most frequent GPT-2 ids (``<|endoftext|>`` always in, as BOS),
    then ``OTHER``."""
    ids = most_frequent(counts[:D_VOCAB], vocab_size - 1)
    if EOT_TOKEN not in ids:
        ids = ids[: vocab_size - 2] + [EOT_TOKEN]
    return ids + [OTHER]


def compact(source: str | Path, out: str | Path, vocab_size: int, *, force: bool = False, log=print) -> Path:
    """Rewrite the prepared data at ``source`` over its ``vocab_size`` most frequent
    training tokens into ``out`` and return ``out``. Raises DataPrepError for anything
    the user can fix.

    >>> compact("data/python-stdlib", "data/python-stdlib-v2048", 2048)  # doctest: +SKIP
    """
    source, out = Path(source), Path(out)
    if not isinstance(vocab_size, int) or not MIN_VOCAB <= vocab_size <= D_VOCAB:
        raise DataPrepError(f"--vocab-size must be an integer in [{MIN_VOCAB}, {D_VOCAB}], got {vocab_size!r}")
    if source.resolve() == out.resolve():
        raise DataPrepError(f"--out {out} is the source itself; give a new directory")
    try:
        train = TokenDataset(source, "train")
        splits = {name: TokenDataset(source, name) for name in SPLITS  # val may have been prepared empty
                  if train.manifest["splits"].get(name, {}).get("shards")}
    except ShardError as e:
        raise DataPrepError(f"cannot read the source: {e}") from None
    if train.vocab is not None:
        raise DataPrepError(f"{source} already has a compact vocabulary of {len(train.vocab)}; compact the data "
                            "it was made from")
    options = {"source": str(source.resolve()), "vocab_size": vocab_size}
    if (out / MANIFEST).is_file() and not force:
        try:
            done = json.loads((out / MANIFEST).read_text()).get("vocab", {}).get("options")
        except ValueError:
            done = None
        if done == options:
            log(f"{out} is already complete ({MANIFEST} matches these options): nothing to do; pass --force to rebuild")
            return out
        raise DataPrepError(f"{out} already holds other prepared data; choose another --out, or pass --force to "
                            "replace it")
    if out.exists() and not out.is_dir():
        raise DataPrepError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file() and not force:
        raise DataPrepError(f"{out} is not empty and holds no prepared data; choose another --out, or pass --force")

    start = time.perf_counter()
    vocab = choose_vocab(token_counts(train), vocab_size)
    table = np.asarray(compact_table(vocab), dtype=np.uint16)
    manifest = copy.deepcopy(train.manifest)  # the source's, with the new shards' hashes and the vocabulary
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the output is unfinished
    other_fraction = {}
    try:
        for name, dataset in splits.items():
            other, total = 0, 0
            for entry, shard in zip(manifest["splits"][name]["shards"], dataset.shards):
                ids = table[shard]
                entry["sha256"] = write_shard(out / entry["file"], ids)
                other += int((ids == vocab_size - 1).sum())
                total += len(ids)
            other_fraction[name] = other / total
    finally:
        remove_temporaries(out)
    remove_shards_except(out, {s["file"] for split in manifest["splits"].values() for s in split["shards"]})
    manifest["vocab"] = {"size": vocab_size, "ids": vocab, "other_fraction": other_fraction, "options": options,
                         "source_manifest": {"source": manifest["source"], "options": manifest["options"]}}
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {out}: {vocab_size:,} tokens ({vocab_size - 1:,} most frequent + 1 for every other token); the "
        "other token is " + ", ".join(f"{f:.1%} of {n}" for n, f in other_fraction.items())
        + f" ({time.perf_counter() - start:.1f} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.compact",
                                description="Rewrite prepared data over its most frequent training tokens "
                                            "(a compact vocabulary: smaller, faster models).")
    p.add_argument("source", help="prepared data directory (python -m data_prep.prepare)")
    p.add_argument("--vocab-size", type=int, required=True,
                   help="tokens in the compact vocabulary: the most frequent training tokens, plus one id for "
                        "every other token")
    p.add_argument("--out", required=True, help="output directory for the rewritten shards and manifest.json")
    p.add_argument("--force", action="store_true", help="rebuild even if --out holds finished output")
    args = p.parse_args(argv)
    try:
        compact(args.source, args.out, args.vocab_size, force=args.force)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
