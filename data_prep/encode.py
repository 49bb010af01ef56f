"""Tokenise a stream of documents in worker processes, in order.

Each document becomes ``[EOT] + encode_ordinary(text)``. Documents travel to the
workers in chunks of about ``CHUNK_CHARS`` characters and come back in the order they
were sent, so the output is the same whatever the number of workers. A whole-file
document (``FileText``) travels as its path: the worker reads it, and reports what
reading it found (an empty file, undecodable bytes) with the chunk's tokens.
"""

import multiprocessing
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from data_prep.sources import FileText, SourceStats
from hooked_gpt2.tokenizer import EOT_TOKEN, get_tokenizer

# Large enough that pickling and process hand-offs are noise next to tokenising a chunk,
# small enough that a few chunks in flight per worker stay a few megabytes.
CHUNK_CHARS = 1 << 18
# Queued per child so that it never waits for work; at the end this process takes queued
# chunks back from the tail, so a deeper queue costs nothing there.
CHUNKS_IN_FLIGHT_PER_WORKER = 4


def encode_document(text: str) -> np.ndarray:
    """``[EOT] + encode_ordinary(text)`` as uint16.

    ``encode_to_numpy`` with no special tokens allowed gives the same ids as
    ``encode_ordinary`` (a literal "<|endoftext|>" in the text stays ordinary text)
    without building a Python list of ints, which costs about 10% of tokenising.
    """
    enc = get_tokenizer()
    try:
        ids = enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates (from JSON escapes): encode_ordinary repairs them
        ids = np.asarray(enc.encode_ordinary(text), dtype=np.uint32)
    tokens = np.empty(len(ids) + 1, dtype=np.uint16)
    tokens[0] = EOT_TOKEN
    tokens[1:] = ids
    return tokens


def encode_chunk(documents: list[str | FileText]) -> tuple[np.ndarray, np.ndarray, SourceStats]:
    """All tokens of a chunk of documents, concatenated; each document's length; and what
    reading its files found. An empty document is skipped (it would be a lone EOT)."""
    stats = SourceStats()
    docs = []
    for doc in documents:
        text = doc.read(stats) if isinstance(doc, FileText) else doc
        if text:
            docs.append(encode_document(text))
        else:
            stats.empty_documents += 1
    if not docs:
        return np.empty(0, dtype=np.uint16), np.empty(0, dtype=np.int64), stats
    return np.concatenate(docs), np.array([len(d) for d in docs], dtype=np.int64), stats


def chunk_documents(documents: Iterable[str | FileText], tag: Callable[[], Any] = lambda: None,
                    chunk_chars: int = CHUNK_CHARS) -> Iterator[tuple[list[str | FileText], Any]]:
    """Chunks of about ``chunk_chars`` characters (a file counts its bytes), each with
    ``tag()`` taken as it closes.

    Chunk boundaries depend only on the documents, so the tags (the reader's counters
    at that point) are the same whatever the number of workers or how far ahead the
    workers have read.
    """
    chunk, size = [], 0
    for doc in documents:
        chunk.append(doc)
        size += doc.size if isinstance(doc, FileText) else len(doc)
        if size >= chunk_chars:
            yield chunk, tag()
            chunk, size = [], 0
    if chunk:
        yield chunk, tag()


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the parent handles it and stops the pool,
    # so workers should not each print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def encode_documents(documents: Iterable[str | FileText], workers: int,
                     tag: Callable[[], SourceStats] = SourceStats, chunk_chars: int = CHUNK_CHARS,
                     ) -> Iterator[tuple[list[np.ndarray], SourceStats]]:
    """Chunk by chunk, in input order: the tokens of each non-empty document, tokenised by
    ``workers`` processes, and the source's counters as of the end of the chunk. Those
    are ``tag()`` taken as the chunk closed (what this process's reading found) plus what
    reading files found in the workers, for this chunk and every earlier one.

    >>> [[t.tolist() for t in docs] for docs, _ in encode_documents(["Hello world"], workers=1)]
    [[[50256, 15496, 995]]]
    """
    found_by_workers = SourceStats()
    for (tokens, lengths, stats), chunk_tag in encode_chunks(chunk_documents(documents, tag, chunk_chars), workers):
        found_by_workers = found_by_workers.plus(stats)
        yield np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else [], chunk_tag.plus(found_by_workers)


def start_method() -> str:
    """How the tokenising workers start. fork starts them in milliseconds with the tokenizer
    already built, but a process that runs other threads (a notebook's, a library's
    background thread) can fork while one of them holds a lock, and the child then waits on
    it forever: there, and where fork does not exist (macOS, Windows), forkserver or spawn,
    which start each worker afresh."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def encode_chunks(chunks: Iterable[tuple[list[str | FileText], Any]], workers: int) -> Iterator[tuple[tuple, Any]]:
    """Each chunk's ``encode_chunk`` result with its tag, in input order, from ``workers``
    tokenising processes: this one and ``workers - 1`` children.

    This process reads the input and writes the output, and tokenises a chunk itself
    whenever the children already have enough queued. On 2 CPUs that makes 2 busy
    processes, not 2 workers plus a reader competing for 2 CPUs.
    """
    if workers == 1:
        # No pool: a process hand-off would only add cost.
        yield from ((encode_chunk(chunk), chunk_tag) for chunk, chunk_tag in chunks)
        return
    get_tokenizer()  # load the ranks once here; forked workers inherit them
    children = workers - 1
    pool = multiprocessing.get_context(start_method()).Pool(children, initializer=_ignore_sigint)
    try:
        # Pool.imap would read the whole input ahead (a streamed dataset in memory); a
        # bounded window of results keeps order and bounds memory.
        pending: deque = deque()  # [AsyncResult or _Done, tag, chunk], in input order
        for chunk, chunk_tag in chunks:
            queued = sum(1 for result, _, _ in pending if not result.ready())
            if queued < children * CHUNKS_IN_FLIGHT_PER_WORKER:
                pending.append([pool.apply_async(encode_chunk, (chunk,)), chunk_tag, chunk])
            else:
                pending.append([_Done(encode_chunk(chunk)), chunk_tag, chunk])
            while pending and (pending[0][0].ready() or len(pending) > workers * CHUNKS_IN_FLIGHT_PER_WORKER):
                result, done_tag, _ = pending.popleft()
                yield result.get(), done_tag
        # The input is done. The children work through their queues front to back; this
        # process takes queued chunks from the back, so that both finish at about the same
        # time instead of this one waiting for whole queues. (A chunk a child started too
        # is computed twice; the pool is terminated on the way out.)
        while pending:
            if not pending[0][0].ready():
                behind = [entry for entry in list(pending)[1:] if not entry[0].ready()]
                if behind:
                    behind[-1][0] = _Done(encode_chunk(behind[-1][2]))
                    continue
            result, done_tag, _ = pending.popleft()
            yield result.get(), done_tag
    except BaseException:  # an error, Ctrl-C, or the consumer closing this generator early
        pool.terminate()
        raise
    # Stopping the pool joins its threads and children (about 10 ms): let that overlap
    # the caller's writing of the last shard.
    threading.Thread(target=pool.terminate, daemon=True).start()


class _Done:
    """A result computed in this process, with AsyncResult's ``ready`` and ``get``."""

    def __init__(self, value):
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self):
        return self.value
