"""Prepare training data: read a source, tokenise it with GPT-2's BPE, write shards.

    python -m data_prep.prepare --source python-stdlib --out data/python-stdlib
    python -m data_prep.prepare --source fineweb-edu --out data/fineweb-edu --max-tokens 3200000000
    python -m data_prep.prepare --source input.txt --out data/mine     # one text file: paragraphs

Output: ``train_000000.bin ...`` and ``val_000000.bin ...`` in llm.c's shard layout, and
``manifest.json``, written last, whose presence means the output is complete. Re-running
the same command over complete output does nothing; over an interrupted run, it keeps
the finished shards and completes the job.

Splits: every ``val_every``-th document goes to validation until it holds ``val_tokens``
tokens; all other documents go to training. Validation holds whole documents only. A
``.txt`` file is one document, except when it is the whole source (``--txt-docs auto``):
then its blank-line-separated paragraphs are the documents, so both splits get some.
``max_tokens`` caps the training split exactly: its last document may be cut, so a
token budget is met to the token.
"""

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from data_prep.encode import encode_documents
from data_prep.shards import (
    HEADER_INT32, MAGIC, MANIFEST, MAX_SHARD_TOKENS, VERSION, ShardWriter,
    remove_shards_except, remove_temporaries, shard_size,
)
from data_prep.sources import (
    TXT_DOCS, DataPrepError, Source, SourceStats, TextOptions, resolve_source, resolve_txt_docs,
)
from data_prep.summary import format_summary
from hooked_gpt2.atomic import atomic_write
from hooked_gpt2.tokenizer import D_VOCAB, EOT_TOKEN, tokenizer_sha256

__all__ = ["prepare", "ensure_default_data", "DataPrepError", "main"]

DEFAULT_VAL_TOKENS = 100_000  # about 2% of the python-stdlib corpus
DEFAULT_VAL_EVERY = 50  # spreads the python-stdlib validation documents over the whole library
DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's FineWeb shard size: 200 MB files
FORMAT = "hooked-gpt2 token shards"


def package_version() -> str:
    try:
        return importlib.metadata.version("hooked-gpt2")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            import tomllib

            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (ImportError, OSError, KeyError):
            return "0.1.0"


@contextlib.contextmanager
def gc_skips_existing_objects():
    """Keep the objects that exist now out of Python's cyclic garbage collector until the
    block ends (objects made inside it are collected as usual).

    A process that imported torch holds about 170,000 of them, and a full collection walks
    them all: about 0.1 s, which struck at random points of a 1 s preparation, in this
    process and in each forked worker (where the walk also copies their pages). Freezing
    before fork is what the gc module's documentation recommends.
    """
    if gc.get_freeze_count():  # the caller froze objects itself: leave that alone
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@gc_skips_existing_objects()
def prepare(source: str, out: str | Path, *, max_tokens: int | None = None,
            val_tokens: int = DEFAULT_VAL_TOKENS, val_every: int = DEFAULT_VAL_EVERY,
            workers: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS, force: bool = False,
            text_column: str = "text", config: str | None = None, min_int_score: int | None = None,
            data_files: str | None = None, txt_docs: str = "auto", progress: bool = True,
            log=print) -> Path:
    """Tokenise ``source`` into shards under ``out`` and return ``out``.

    ``source`` is ``python-stdlib``, ``fineweb-edu``, ``hf:NAME[:CONFIG]`` or a local
    file, directory or glob of ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` files.
    Raises DataPrepError for anything the user can fix.

    >>> out = prepare("python-stdlib", tmp_path / "stdlib-demo", max_tokens=50_000,
    ...               val_tokens=5_000, progress=False, log=lambda *a: None)
    >>> sorted(p.name for p in out.iterdir())
    ['manifest.json', 'train_000000.bin', 'val_000000.bin']
    """
    workers = workers if workers is not None else default_workers()
    if txt_docs in TXT_DOCS:
        txt_docs = resolve_txt_docs(source, txt_docs)
    options = {
        "source": source, "max_tokens": max_tokens, "val_tokens": val_tokens, "val_every": val_every,
        "shard_tokens": shard_tokens, "text_column": text_column, "config": config,
        "min_int_score": min_int_score, "data_files": data_files, "txt_docs": txt_docs,
    }
    check_options(options, workers)
    out = Path(out)
    if (out / MANIFEST).exists() and not force and is_complete(out, options, log):
        log(f"{out} is already complete ({MANIFEST} matches these options): nothing to do; "
            "pass --force to rebuild")
        return out
    text_options = TextOptions(text_column=text_column, min_int_score=min_int_score, txt_docs=txt_docs)
    src = resolve_source(source, config=config, data_files=data_files, opts=text_options)

    created = not out.exists()
    if out.exists() and not out.is_dir():
        raise DataPrepError(f"--out {out} is a file; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the output is unfinished
    start = time.perf_counter()
    try:
        manifest = write_splits(src, out, options, workers, progress)
    except DataPrepError:
        discard_output(out, created)
        raise
    finally:
        # Finished shards stay (a re-run reuses them); half-written ones never do.
        remove_temporaries(out)
    remove_shards_except(out, {s["file"] for split in manifest["splits"].values() for s in split["shards"]})
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    log(format_summary(manifest, time.perf_counter() - start))
    return out


def ensure_default_data(out: str | Path = "data/python-stdlib", *, vocab_size: int | None = None,
                        compact_out: str | Path | None = None, **kwargs) -> Path:
    """The embedded python-stdlib corpus under ``out``, prepared on first use; with
    ``vocab_size``, also rewritten over a compact vocabulary of that many tokens into
    ``compact_out`` (``data_prep.compact``), which is returned then.

    Under DDP, call it on one rank and wait at a barrier: two processes preparing the
    same directory at once would race on its temporary files.

    >>> data_dir = ensure_default_data(tmp_path / "stdlib-demo", max_tokens=50_000, val_tokens=5_000,
    ...                                progress=False, log=lambda *a: None)
    """
    data = prepare("python-stdlib", out, **kwargs)
    if vocab_size is None:
        return data
    from data_prep.compact import compact  # here: it reads shards through torch, which preparing never needs

    return compact(data, compact_out, vocab_size, log=kwargs.get("log", print))


def default_workers() -> int:
    """CPUs this process may run on (a container or taskset may allow fewer than exist)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_options(options: dict, workers: int) -> None:
    def at_least(name: str, value, low: int, high: int | None = None):
        if not isinstance(value, int) or value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise DataPrepError(f"--{name.replace('_', '-')} must be an integer {bound}, got {value!r}")

    if options["max_tokens"] is not None:
        at_least("max_tokens", options["max_tokens"], 1)
    at_least("val_tokens", options["val_tokens"], 0)
    at_least("val_every", options["val_every"], 1)
    at_least("shard_tokens", options["shard_tokens"], 1, MAX_SHARD_TOKENS)
    at_least("workers", workers, 1, 1024)
    if options["min_int_score"] is not None:
        at_least("min_int_score", options["min_int_score"], 0, 5)
    if options["txt_docs"] not in TXT_DOCS:
        raise DataPrepError(f"--txt-docs must be one of {', '.join(TXT_DOCS)}, got {options['txt_docs']!r}")


def is_complete(out: Path, options: dict, log) -> bool:
    """True if ``out`` holds finished output for ``options``; error if for other options."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        done_options, splits = manifest["options"], manifest["splits"]
    except (OSError, ValueError, KeyError):
        log(f"{out / MANIFEST} is unreadable; rebuilding")
        return False
    if done_options != json.loads(json.dumps(options)):
        changed = sorted(k for k in options if done_options.get(k) != options[k])
        raise DataPrepError(f"{out} already holds data prepared with other options "
                            f"(different {', '.join(changed)}); pass --force to rebuild it, or choose another --out")
    for split in splits.values():
        for shard in split["shards"]:
            path = out / shard["file"]
            if not path.exists() or path.stat().st_size != shard_size(shard["tokens"]):
                log(f"{path} is missing or the wrong size; rebuilding")
                return False
    return True


def write_splits(src: Source, out: Path, options: dict, workers: int, progress: bool) -> dict:
    """Route each document to a split and write both splits' shards; return the manifest."""
    max_tokens, val_tokens, val_every = options["max_tokens"], options["val_tokens"], options["val_every"]
    train = ShardWriter(out, "train", options["shard_tokens"])
    val = ShardWriter(out, "val", options["shard_tokens"])
    meter = Progress(max_tokens, progress)
    n_docs, stats, cut = 0, src.stats, False
    # Counters come with each chunk, not from src.stats at the end: the reader runs
    # ahead of the workers by an amount that depends on their number.
    def full() -> bool:
        return max_tokens is not None and train.tokens >= max_tokens and val.tokens >= val_tokens

    with contextlib.closing(encode_documents(src.documents, workers, src.stats.snapshot)) as chunks, meter:
        for docs, stats in chunks:
            for tokens in docs:
                if val.tokens < val_tokens and n_docs % val_every == 0:
                    val.add(tokens)
                    val.documents += 1
                elif max_tokens is None or train.tokens < max_tokens:
                    room = len(tokens) if max_tokens is None else max_tokens - train.tokens
                    cut = room < len(tokens)
                    train.add(tokens[:room])
                    train.documents += 1
                n_docs += 1
                meter.update(len(tokens))
                if full():
                    break
            if full():
                break  # closing the generator stops the workers
    train.flush()
    val.flush()
    if train.tokens == 0:
        raise empty_corpus_error(options["source"], n_docs, stats)
    return {
        "format": FORMAT,
        "package_version": package_version(),
        "source": options["source"],
        "source_info": src.info,
        "options": options,
        "tokenizer": {"name": "gpt2", "ranks_sha256": tokenizer_sha256(), "eot_token": EOT_TOKEN,
                      "vocab_size": D_VOCAB},
        "shard_format": {"layout": "llm.c", "magic": MAGIC, "version": VERSION,
                         "header_int32": HEADER_INT32, "token_dtype": "uint16 little-endian"},
        "splits": {w.split: {"tokens": w.tokens, "documents": w.documents, "shards": w.shards}
                   for w in (train, val)},
        "train_last_document_cut": cut,
        "source_stats": {
            "empty_documents": stats.empty_documents,
            "filtered_documents": stats.filtered_documents,
            "replaced_characters": stats.replaced_characters,
            "files_with_replacements": stats.files_with_replacements,
            "examples_with_replacements": stats.examples_with_replacements,
        },
    }


def empty_corpus_error(source: str, n_docs: int, stats: SourceStats) -> DataPrepError:
    if n_docs == 0:
        skipped = stats.empty_documents + stats.filtered_documents
        return DataPrepError(f"{source} holds no documents to train on"
                             f"{f' ({skipped} empty or filtered out)' if skipped else ''}")
    return DataPrepError(f"all {n_docs} document(s) of {source} went to the validation split, which holds "
                         "whole documents; lower --val-tokens (0 for none), or split large text files "
                         "into documents at blank lines with --txt-docs paragraph")


class Progress:
    """A tqdm bar counting tokens, with documents/s beside it; quiet when not a terminal."""

    def __init__(self, total_tokens: int | None, enabled: bool):
        self.bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="tokenising",
                        disable=None if enabled else True, file=sys.stderr)
        self.docs, self.start, self.last = 0, time.perf_counter(), 0.0

    def update(self, n_tokens: int) -> None:
        self.docs += 1
        self.bar.update(n_tokens)
        now = time.perf_counter()
        if now - self.last > 0.5:  # set_postfix redraws; throttle it
            self.last = now
            self.bar.set_postfix_str(f"{self.docs / (now - self.start):,.0f} docs/s", refresh=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def discard_output(out: Path, created: bool) -> None:
    """After a user error, leave nothing that looks like (or is part of) finished output."""
    remove_shards_except(out, set())
    remove_temporaries(out)
    if created and not any(out.iterdir()):
        shutil.rmtree(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.prepare",
        description="Tokenise a corpus with GPT-2's BPE into llm.c-format shards plus manifest.json.")
    p.add_argument("--source", required=True,
                   help="python-stdlib (embedded, no download), fineweb-edu, hf:NAME[:CONFIG], "
                        "or a local .txt/.jsonl/.json/.parquet file, directory or glob")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="stop after exactly this many training tokens (default: the whole source)")
    p.add_argument("--val-tokens", type=int, default=DEFAULT_VAL_TOKENS,
                   help=f"validation tokens, as whole documents (default {DEFAULT_VAL_TOKENS:,}; 0 for none)")
    p.add_argument("--val-every", type=int, default=DEFAULT_VAL_EVERY,
                   help=f"send every Nth document to validation until it is full (default {DEFAULT_VAL_EVERY})")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenising processes, this one included (default: the CPUs available); "
                        "output does not depend on it")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--force", action="store_true", help="rebuild even if --out holds finished output")
    p.add_argument("--text-column", default="text", help="record field holding the text (default: text)")
    p.add_argument("--config", default=None,
                   help="dataset config for fineweb-edu (default sample-10BT) or hf: sources")
    p.add_argument("--min-int-score", type=int, default=None,
                   help="keep only records whose int_score is at least this (FineWeb-edu: 0-5)")
    p.add_argument("--data-files", default=None,
                   help="local parquet files (file, directory or glob) to read for fineweb-edu or hf: "
                        "sources instead of the hub")
    p.add_argument("--txt-docs", choices=TXT_DOCS, default="auto",
                   help="how .txt files split into documents: one per file, or one per blank-line-separated "
                        "paragraph; auto (default): paragraphs when the source is one .txt file, else files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prepare(args.source, args.out, max_tokens=args.max_tokens, val_tokens=args.val_tokens,
                val_every=args.val_every, workers=args.workers, shard_tokens=args.shard_tokens,
                force=args.force, text_column=args.text_column, config=args.config,
                min_int_score=args.min_int_score, data_files=args.data_files, txt_docs=args.txt_docs)
    except DataPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; re-run the same command to complete the job",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
