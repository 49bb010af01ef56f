"""Where documents come from: the Python standard library that ships with every
interpreter, FineWeb-edu and other Hugging Face datasets, and local ``.txt``,
``.jsonl`` / ``.json`` and ``.parquet`` files.

A source is an iterator of documents in a fixed order, so the same source gives the
same token stream on every run and every machine. A document is a string, or a
``FileText``: a whole file, read by whichever process tokenises it.
"""

import dataclasses
import glob
import json
import os
import re
import socket
import sys
import sysconfig
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
FINEWEB_EDU_CONFIG = "sample-10BT"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TXT_DOCS = ("auto", "file", "paragraph")
# Directories of the standard library that are not the library itself.
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
HUB_PROBE_TIMEOUT_S = 3.0
MAX_EXAMPLES = 20  # files named as having undecodable bytes


class DataPrepError(ValueError):
    """A problem the user can fix: bad path, bad option, unusable data.

    The command line prints it as ``error: <message>`` without a traceback.
    """


@dataclass
class SourceStats:
    """What a source dropped or repaired on the way, reported in the summary."""

    empty_documents: int = 0
    filtered_documents: int = 0
    replaced_characters: int = 0
    files_with_replacements: int = 0
    examples_with_replacements: list[str] = field(default_factory=list)  # the first few, by name

    def snapshot(self) -> "SourceStats":
        return dataclasses.replace(self, examples_with_replacements=list(self.examples_with_replacements))

    def plus(self, other: "SourceStats") -> "SourceStats":
        """Both counts together (this one's examples first)."""
        return SourceStats(
            self.empty_documents + other.empty_documents,
            self.filtered_documents + other.filtered_documents,
            self.replaced_characters + other.replaced_characters,
            self.files_with_replacements + other.files_with_replacements,
            (self.examples_with_replacements + other.examples_with_replacements)[:MAX_EXAMPLES],
        )


@dataclass(frozen=True)
class FileText:
    """A whole text file as one document, read where it is tokenised: a worker process
    reads it from disk itself, instead of this process reading it and sending the text."""

    path: Path
    size: int  # bytes: how much of a chunk it fills

    def read(self, stats: SourceStats) -> str:
        return read_text(self.path, stats)


@dataclass
class Source:
    kind: str  # "python-stdlib", "hf" or "local"
    info: dict  # what the manifest records about where the data came from
    documents: Iterator["str | FileText"]
    stats: SourceStats


@dataclass
class TextOptions:
    text_column: str = "text"
    min_int_score: int | None = None
    txt_docs: str = "file"


def resolve_source(source: str, *, config: str | None = None, data_files: str | None = None,
                   opts: TextOptions | None = None) -> Source:
    """Check that ``source`` exists and build its (lazy) document iterator.

    Problems visible without reading the data (a missing path, offline hub, an option
    that does not apply) are raised here, before any output is created.
    """
    opts = opts or TextOptions()
    stats = SourceStats()
    if source == "python-stdlib":
        if opts.min_int_score is not None:
            raise DataPrepError("--min-int-score needs records with an int_score field; "
                                "python-stdlib has none")
        root = Path(sysconfig.get_paths()["stdlib"])
        files = stdlib_files(root)
        info = {"stdlib": str(root), "python": sys.version.split()[0], "files": len(files)}
        return Source("python-stdlib", info, file_texts(files), stats)
    if source == "fineweb-edu":
        if data_files:
            return hf_source("parquet", None, local_files(data_files, (".parquet",), "--data-files"), opts, stats)
        return hf_source(FINEWEB_EDU, config or FINEWEB_EDU_CONFIG, None, opts, stats)
    if source.startswith("hf:"):
        name, _, hf_config = source[3:].partition(":")
        if not name:
            raise DataPrepError("hf: needs a dataset name, e.g. --source hf:roneneldan/TinyStories")
        files = local_files(data_files, None, "--data-files") if data_files else None
        return hf_source(name, hf_config or config, files, opts, stats)
    files = local_files(source, LOCAL_SUFFIXES)
    if opts.min_int_score is not None and any(f.suffix == ".txt" for f in files):
        raise DataPrepError("--min-int-score needs records with an int_score field; .txt files have none")
    info = {"files": len(files)}
    if opts.txt_docs == "paragraph" and len(files) == 1 and files[0].suffix == ".txt":
        info["documents"] = (f"{files[0].name} split into documents at blank lines (--txt-docs paragraph; "
                             "--txt-docs file keeps it one document)")
    return Source("local", info, local_documents(files, opts, stats), stats)


def resolve_txt_docs(source: str, txt_docs: str) -> str:
    """``auto``: one text file is split into paragraphs (so a single corpus file, such as
    tiny Shakespeare, yields documents for both splits); otherwise one document per file."""
    if txt_docs != "auto":
        return txt_docs
    path = Path(source)
    return "paragraph" if path.suffix == ".txt" and path.is_file() else "file"


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's ``.py`` files without its tests, in sorted (stable) order."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def local_files(pattern: str, suffixes: tuple[str, ...] | None, flag: str = "--source") -> list[Path]:
    """A file, a directory (searched recursively) or a glob, as a sorted list of files."""
    if any(ch in pattern for ch in "*?["):
        matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
        if not matches:
            raise DataPrepError(f"no files match {pattern!r}")
    elif Path(pattern).is_dir():
        matches = sorted(p for p in Path(pattern).rglob("*") if p.is_file())
    elif Path(pattern).exists():
        matches = [Path(pattern)]
    else:
        hint = ("; --source takes python-stdlib, fineweb-edu, hf:NAME[:CONFIG], or a local file, "
                "directory or glob") if flag == "--source" else f" (given as {flag})"
        raise DataPrepError(f"{pattern} does not exist{hint}")
    if suffixes is None:
        return matches
    if len(matches) == 1 and matches[0].suffix not in suffixes:
        raise DataPrepError(f"{matches[0]}: unsupported file type {matches[0].suffix or '(none)'}; "
                            f"use {', '.join(suffixes)}")
    files = [p for p in matches if p.is_file() and p.suffix in suffixes]
    if not files:
        raise DataPrepError(f"{pattern} holds no {', '.join(suffixes)} files")
    return files


def local_documents(files: list[Path], opts: TextOptions, stats: SourceStats) -> Iterator[str | FileText]:
    for path in files:
        if path.suffix == ".txt" and opts.txt_docs == "file":
            yield from file_texts([path])
        elif path.suffix == ".txt":
            yield from nonempty(paragraphs(read_text(path, stats)), stats)
        elif path.suffix == ".parquet":
            yield from parquet_documents(path, opts, stats)
        else:
            yield from json_documents(path, opts, stats)


def file_texts(files: list[Path]) -> Iterator[FileText]:
    for path in files:
        try:
            size = path.stat().st_size
        except OSError as err:
            raise DataPrepError(f"cannot read {path}: {err.strerror}") from None
        yield FileText(path, size)


def nonempty(texts: Iterable[str], stats: SourceStats) -> Iterator[str]:
    """Skip empty documents (an empty ``__init__.py``): they would be a lone EOT."""
    for text in texts:
        if text:
            yield text
        else:
            stats.empty_documents += 1


def paragraphs(text: str) -> list[str]:
    """Blank-line-separated paragraphs, for a text file that is many short documents."""
    return [p for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def decode(data: bytes, where: str, stats: SourceStats) -> str:
    """UTF-8 text; undecodable bytes become U+FFFD and are counted, not fatal."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # Count only what the decoder replaced, not U+FFFD already in the text.
        clean = data.decode("utf-8", errors="ignore")
        stats.replaced_characters += text.count("\ufffd") - clean.count("\ufffd")
        stats.files_with_replacements += 1
        if len(stats.examples_with_replacements) < MAX_EXAMPLES:
            stats.examples_with_replacements.append(where)
        return text


def read_text(path: Path, stats: SourceStats) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataPrepError(f"cannot read {path}: {err.strerror}") from None
    return decode(data, str(path), stats)


def record_text(record: dict, where: str, opts: TextOptions, stats: SourceStats) -> str | None:
    """The document in one record, or None if it is empty or filtered out."""
    if opts.text_column not in record:
        raise DataPrepError(f"{where}: no {opts.text_column!r} field (fields: {', '.join(map(str, record))}); "
                            "name the text field with --text-column")
    if opts.min_int_score is not None:
        if "int_score" not in record:
            raise DataPrepError(f"{where}: --min-int-score needs an int_score field, "
                                f"found only {', '.join(map(str, record))}")
        if record["int_score"] is None or record["int_score"] < opts.min_int_score:
            stats.filtered_documents += 1
            return None
    text = record[opts.text_column]
    if text is None or text == "":
        stats.empty_documents += 1
        return None
    if not isinstance(text, str):
        raise DataPrepError(f"{where}: field {opts.text_column!r} holds {type(text).__name__}, not text")
    return text


def json_documents(path: Path, opts: TextOptions, stats: SourceStats) -> Iterator[str]:
    """JSON lines, or (for a ``.json`` file starting with ``[``) one array of records."""
    with open(path, "rb") as f:
        is_array = path.suffix == ".json" and f.read(64).lstrip().startswith(b"[")
    if is_array:
        try:
            records = json.loads(read_text(path, stats))
        except json.JSONDecodeError as exc:
            raise DataPrepError(f"{path}: not valid JSON ({exc})") from None
        for i, record in enumerate(records):
            text = record_text(as_record(record, f"{path} item {i}"), f"{path} item {i}", opts, stats)
            if text is not None:
                yield text
        return
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(decode(line, where, stats))
            except json.JSONDecodeError as exc:
                raise DataPrepError(f"{where}: not a JSON record ({exc})") from None
            text = record_text(as_record(record, where), where, opts, stats)
            if text is not None:
                yield text


def as_record(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataPrepError(f"{where}: expected a JSON object with a text field, got {type(record).__name__}")
    return record


def parquet_documents(path: Path, opts: TextOptions, stats: SourceStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataPrepError(f"{path}: not a readable parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    columns = [opts.text_column] + (["int_score"] if opts.min_int_score is not None else [])
    missing = [c for c in columns if c not in names]
    if missing:
        hint = "name the text column with --text-column" if opts.text_column in missing else \
            "--min-int-score needs an int_score column"
        raise DataPrepError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)}); {hint}")
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
        for record in batch.to_pylist():
            text = record_text(record, str(path), opts, stats)
            if text is not None:
                yield text


def hf_source(path: str, config: str | None, data_files: list[Path] | None,
              opts: TextOptions, stats: SourceStats) -> Source:
    """A ``datasets`` dataset, streamed, so nothing larger than a batch is held in memory.

    FineWeb-edu from the hub and FineWeb-edu from downloaded parquet files go through
    the same ``load_dataset`` call; only ``path`` and ``data_files`` differ.
    """
    if data_files is None and not Path(path).exists():
        require_hub(path, "--source fineweb-edu --data-files DIR" if path == FINEWEB_EDU
                    else f"--source hf:{path} --data-files FILES")
    files = [str(p) for p in data_files] if data_files else None
    info = {"dataset": path, "config": config, "data_files": len(files) if files else None}
    return Source("hf", info, hf_documents(path, config, files, opts, stats), stats)


def hf_documents(path: str, config: str | None, data_files: list[str] | None,
                 opts: TextOptions, stats: SourceStats) -> Iterator[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(path, name=config, data_files=data_files,
                                        split="train", streaming=True)
    except Exception as exc:  # hub, auth and config errors all mean "cannot use this source"
        raise DataPrepError(f"cannot load dataset {path!r}"
                            f"{f' config {config!r}' if config else ''}: {exc}") from None
    for i, record in enumerate(dataset):
        text = record_text(record, f"{path} record {i}", opts, stats)
        if text is not None:
            yield text


def require_hub(dataset: str, local_form: str) -> None:
    """Fail in seconds, not minutes of retries, when the hub cannot be reached."""
    advice = (f"cannot stream {dataset} from the Hugging Face hub: {{why}}. Prepare from local "
              f"files instead: download its parquet files elsewhere and pass {local_form} "
              "(or --source DIR), or use the embedded corpus with --source python-stdlib")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            raise DataPrepError(advice.format(why=f"{var} is set"))
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # behind a proxy a direct connection proves nothing; let datasets try
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    if not can_connect(host, port, HUB_PROBE_TIMEOUT_S):
        raise DataPrepError(advice.format(why=f"{host} is unreachable (offline?)"))


def can_connect(host: str, port: int, timeout: float) -> bool:
    """A TCP connection within ``timeout`` seconds, DNS lookup included.

    The lookup ignores socket timeouts, so the probe runs in a daemon thread.
    """
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result)

