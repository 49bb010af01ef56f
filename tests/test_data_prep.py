"""data_prep: every kind of source, shard layout, resumability, the reader and bad input.

All offline and small: tiny shards so that shard boundaries are crossed, and the
python-stdlib corpus only with a small --max-tokens.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_prep import encode
from data_prep.encode import encode_document, encode_documents
from data_prep.prepare import DataPrepError, ensure_default_data, main, prepare
from data_prep.reader import BatchLoader, ShardError, TokenDataset
from data_prep.sources import FileText, SourceStats
from data_prep.shards import HEADER_BYTES, MAGIC, file_sha256
from hooked_gpt2.tokenizer import EOT_TOKEN, get_tokenizer, tokenizer_sha256

REPO = Path(__file__).resolve().parents[1]
QUIET = {"progress": False, "log": lambda *args: None}


def shared_file(name: str) -> Path:
    for candidate in (REPO.parent / "shared" / "data" / name, Path("/work/shared/data") / name):
        if candidate.exists():
            return candidate
    pytest.skip(f"{name} not found beside the repository or in /work/shared/data")


def split_tokens(out: Path, split: str) -> np.ndarray:
    """A split's stream read straight from the files, independently of the reader."""
    manifest = json.loads((out / "manifest.json").read_text())
    parts = [np.fromfile(out / s["file"], dtype="<u2", offset=HEADER_BYTES)
             for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.array([], dtype="<u2")


def split_docs(out: Path, split: str) -> list[str]:
    """The documents of a split: cut at each EOT token, decoded."""
    tokens = split_tokens(out, split)
    if len(tokens):
        assert tokens[0] == EOT_TOKEN, "every document must start with <|endoftext|>"
    starts = np.flatnonzero(tokens == EOT_TOKEN).tolist() + [len(tokens)]
    return [get_tokenizer().decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, starts[1:])]


def all_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def fineweb_records(n: int) -> list[dict]:
    """Records with FineWeb-edu's columns and varied lengths."""
    words = "the quick brown fox jumps over a lazy dog while students learn algebra".split()
    return [{"text": f"Document {i}: " + " ".join(words[(i + j) % len(words)] for j in range(5 + 7 * (i % 9))),
             "id": f"<urn:uuid:{i:08d}>", "url": f"https://example.org/{i}", "score": 2.5 + (i % 5) / 2,
             "int_score": 2 + i % 3, "token_count": 10 + i} for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


# --- sources -------------------------------------------------------------------------


def test_text_directory_gives_back_each_file_as_a_document(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    texts = {"a.txt": "First file.\n", "b.txt": "Second, with <|endoftext|> as plain text.", "sub/c.txt": "Third"}
    for name, text in texts.items():
        (corpus / name).write_text(text)
    (corpus / "notes.csv").write_text("ignored,in,a,directory")
    out = prepare(str(corpus), tmp_path / "out", val_tokens=0, **QUIET)
    assert split_docs(out, "train") == list(texts.values())
    tokens = split_tokens(out, "train")
    # The literal text "<|endoftext|>" stays ordinary tokens: exactly one EOT per file.
    assert (tokens == EOT_TOKEN).sum() == 3


def test_jsonl_with_fineweb_columns_and_int_score_filter(tmp_path):
    records = fineweb_records(40)
    src = write_jsonl(tmp_path / "docs.jsonl", records)
    out = prepare(str(src), tmp_path / "out", val_tokens=0, min_int_score=3, **QUIET)
    assert split_docs(out, "train") == [r["text"] for r in records if r["int_score"] >= 3]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_stats"]["filtered_documents"] == sum(r["int_score"] < 3 for r in records)


def test_json_array_with_custom_text_column(tmp_path):
    src = tmp_path / "docs.json"
    src.write_text(json.dumps([{"body": "one"}, {"body": "two"}, {"body": ""}]))
    out = prepare(str(src), tmp_path / "out", val_tokens=0, text_column="body", **QUIET)
    assert split_docs(out, "train") == ["one", "two"]


def test_fineweb_edu_path_on_local_parquet_matches_direct_parquet(tmp_path):
    records = fineweb_records(60)
    src = write_parquet(tmp_path / "fineweb.parquet", records)
    direct = prepare(str(src), tmp_path / "direct", val_tokens=200, val_every=4, shard_tokens=300, **QUIET)
    # The fineweb-edu source streams through datasets.load_dataset, here on local data.
    via_hf = prepare("fineweb-edu", tmp_path / "hf", data_files=str(src), val_tokens=200, val_every=4,
                     shard_tokens=300, **QUIET)
    direct_files, hf_files = all_files(direct), all_files(via_hf)
    del direct_files["manifest.json"], hf_files["manifest.json"]
    assert direct_files == hf_files and len(hf_files) > 2
    docs = split_docs(via_hf, "train") + split_docs(via_hf, "val")
    assert sorted(docs) == sorted(r["text"] for r in records)


def test_hf_source_with_local_data_files_and_text_column(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"story": f"Once upon a time {i}."} for i in range(5)])
    out = prepare("hf:json", tmp_path / "out", data_files=str(src), text_column="story", val_tokens=0, **QUIET)
    assert split_docs(out, "train") == [f"Once upon a time {i}." for i in range(5)]
    with pytest.raises(DataPrepError, match="no 'text' field"):
        prepare("hf:json", tmp_path / "bad", data_files=str(src), val_tokens=0, **QUIET)
    assert not (tmp_path / "bad").exists()


def test_tinyshakespeare_whole_file_and_paragraphs(tmp_path):
    text = shared_file("tinyshakespeare.txt").read_text()
    whole = prepare(str(shared_file("tinyshakespeare.txt")), tmp_path / "whole", val_tokens=0, txt_docs="file", **QUIET)
    assert split_docs(whole, "train") == [text]
    paras = prepare(str(shared_file("tinyshakespeare.txt")), tmp_path / "paras", val_tokens=5000,
                    txt_docs="paragraph", **QUIET)
    train, val = split_docs(paras, "train"), split_docs(paras, "val")
    expected = [p for p in text.split("\n\n") if p.strip()]
    assert sorted(train + val) == sorted(expected)
    assert len(split_tokens(paras, "val")) >= 5000 and set(val) <= set(expected)


def test_validation_holds_whole_documents_and_train_the_rest_in_order(tmp_path):
    records = fineweb_records(100)
    src = write_jsonl(tmp_path / "docs.jsonl", records)
    out = prepare(str(src), tmp_path / "out", val_tokens=150, val_every=5, shard_tokens=64, **QUIET)
    texts = [r["text"] for r in records]
    train, val = split_docs(out, "train"), split_docs(out, "val")
    assert val == texts[0 : 5 * len(val) : 5], "val is every 5th document, whole"
    assert train == [t for t in texts if t not in val]
    assert len(split_tokens(out, "val")) >= 150


def test_max_tokens_caps_training_exactly(tmp_path):
    out = prepare("python-stdlib", tmp_path / "out", max_tokens=20_000, val_tokens=3_000, shard_tokens=7_000,
                  **QUIET)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(split_tokens(out, "train")) == manifest["splits"]["train"]["tokens"] == 20_000
    assert [s["tokens"] for s in manifest["splits"]["train"]["shards"]] == [7_000, 7_000, 6_000]
    assert manifest["splits"]["val"]["tokens"] >= 3_000
    assert manifest["train_last_document_cut"]


def test_encode_document_matches_encode_ordinary():
    enc = get_tokenizer()
    for text in ["Hello world", "a <|endoftext|> b", "lone \ud800 surrogate", "π ≈ 3.14159\n\tdef f(): pass"]:
        assert encode_document(text).tolist() == [EOT_TOKEN] + enc.encode_ordinary(text)


# --- output: layout, manifest, determinism, resumability ------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-worker run with many small shards."""
    out = tmp_path_factory.mktemp("reference") / "out"
    prepare("python-stdlib", out, max_tokens=150_000, val_tokens=20_000, shard_tokens=20_000, workers=1, **QUIET)
    return out


def test_shards_use_llm_c_layout_and_manifest_records_them(reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["tokenizer"]["ranks_sha256"] == tokenizer_sha256()
    assert manifest["package_version"] == "0.1.0"
    assert manifest["splits"]["train"]["documents"] > 1
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            path = reference / shard["file"]
            header = np.fromfile(path, dtype="<i4", count=256)
            assert header[:3].tolist() == [MAGIC, 1, shard["tokens"]] and not header[3:].any()
            assert path.stat().st_size == 1024 + 2 * shard["tokens"]
            assert file_sha256(path) == shard["sha256"]


def test_one_and_two_workers_give_identical_bytes(reference, tmp_path):
    out = prepare("python-stdlib", tmp_path / "out", max_tokens=150_000, val_tokens=20_000,
                  shard_tokens=20_000, workers=2, **QUIET)
    assert all_files(out) == all_files(reference)


@pytest.mark.parametrize("workers", [2, 3])
def test_parallel_encoding_keeps_order_when_this_process_shares_the_work(monkeypatch, tmp_path, workers):
    """With many small chunks this process tokenises some itself while the children hold
    others, and files are read by whichever process tokenises them; every document still
    comes back in input order, and each chunk's counters add what this process saw when
    the chunk closed to what the workers found reading files (here: empty files)."""
    inline, done = [], encode._Done

    class Counted(done):
        def __init__(self, value):
            inline.append(1)
            super().__init__(value)

    monkeypatch.setattr(encode, "_Done", Counted)
    texts = [f"document {i}: " + "word " * (i % 37) if i % 50 else "" for i in range(400)]
    docs = []
    for i, text in enumerate(texts):
        if i % 3:
            docs.append(text)
        else:
            (tmp_path / f"{i}.txt").write_text(text)
            docs.append(FileText(tmp_path / f"{i}.txt", len(text)))
    closed = SourceStats()

    def tag():  # what this process "saw" by the time a chunk closed: one filtered doc per chunk
        closed.filtered_documents += 1
        return closed.snapshot()

    got = list(encode_documents([d for d in docs if d != ""], workers, tag=tag, chunk_chars=200))
    tokens = [t.tolist() for chunk, _ in got for t in chunk]
    assert tokens == [encode_document(t).tolist() for t in texts if t]
    counters = [stats for _, stats in got]
    assert [c.filtered_documents for c in counters] == list(range(1, len(got) + 1))
    assert counters[-1].empty_documents == sum(1 for i, t in enumerate(texts) if not t and i % 3 == 0)
    assert inline, "this process never tokenised a chunk itself"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_file_gone_before_its_worker_reads_it_is_a_clear_error(tmp_path, workers):
    (tmp_path / "a.txt").write_text("here")
    docs = [FileText(tmp_path / "a.txt", 4), FileText(tmp_path / "gone.txt", 4)]
    with pytest.raises(DataPrepError, match=r"cannot read .*gone\.txt: No such file"):
        list(encode_documents(docs, workers))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_leaves_no_false_shard_and_rerun_completes_identically(reference, tmp_path, sig):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep.prepare", "--source", "python-stdlib", "--out", str(out),
           "--max-tokens", "150000", "--val-tokens", "20000", "--shard-tokens", "20000", "--workers", "2"]
    env = {**os.environ, "HOOKED_GPT2_PREP_TEST_DELAY": "0.3"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    # Kill while a shard sits half-written under its temporary name, after others finished.
    while not (list(out.glob("*.bin.tmp")) and len(list(out.glob("*.bin"))) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert not (out / "manifest.json").exists()
    if sig == signal.SIGINT:  # Ctrl-C: a clean stop that says how to finish, half-written shard removed
        assert proc.returncode == 130 and "re-run" in proc.stderr.read().decode()
        assert not list(out.glob("*.tmp"))
    for shard in out.glob("*.bin"):  # every shard under its final name is complete
        assert file_sha256(shard) == file_sha256(reference / shard.name)
    with pytest.raises(ShardError, match="manifest.json"):
        TokenDataset(out)
    cmd_fast = {k: v for k, v in os.environ.items() if k != "HOOKED_GPT2_PREP_TEST_DELAY"}
    subprocess.run(cmd, cwd=REPO, env=cmd_fast, check=True, capture_output=True)
    assert all_files(out) == all_files(reference)


def test_rerun_does_nothing_force_rebuilds_and_other_options_refuse(tmp_path):
    out = prepare("python-stdlib", tmp_path / "out", max_tokens=5_000, val_tokens=500, **QUIET)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    messages = []
    prepare("python-stdlib", out, max_tokens=5_000, val_tokens=500, progress=False, log=messages.append)
    assert "nothing to do" in messages[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    with pytest.raises(DataPrepError, match="--force"):
        prepare("python-stdlib", out, max_tokens=6_000, val_tokens=500, **QUIET)
    prepare("python-stdlib", out, max_tokens=6_000, val_tokens=500, force=True, **QUIET)
    assert len(split_tokens(out, "train")) == 6_000


def test_ensure_default_data_prepares_once(tmp_path):
    out = ensure_default_data(tmp_path / "stdlib", max_tokens=3_000, val_tokens=300, **QUIET)
    assert TokenDataset(out).n_tokens == 3_000
    messages = []
    ensure_default_data(out, max_tokens=3_000, val_tokens=300, progress=False, log=messages.append)
    assert "nothing to do" in messages[0]


# --- reader --------------------------------------------------------------------------


def copy_of(reference: Path, dest: Path) -> Path:
    dest.mkdir()
    for name, data in all_files(reference).items():
        (dest / name).write_bytes(data)
    return dest


def test_reader_rejects_corrupt_and_truncated_shards(reference, tmp_path):
    bad_magic = copy_of(reference, tmp_path / "magic")
    with open(bad_magic / "train_000001.bin", "r+b") as f:
        f.write(np.array([1234], dtype="<i4").tobytes())
    with pytest.raises(ShardError, match="train_000001.bin.*magic"):
        TokenDataset(bad_magic)

    truncated = copy_of(reference, tmp_path / "truncated")
    path = truncated / "train_000002.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ShardError, match="train_000002.bin.*truncated"):
        TokenDataset(truncated)

    flipped = copy_of(reference, tmp_path / "flipped")
    data = bytearray((flipped / "val_000000.bin").read_bytes())
    data[-1] ^= 0xFF
    (flipped / "val_000000.bin").write_bytes(bytes(data))
    TokenDataset(flipped, "val")  # same size and header: only the checksum can tell
    with pytest.raises(ShardError, match="val_000000.bin.*sha256"):
        TokenDataset(flipped, "val", verify_sha256=True)


def test_reader_rejects_a_manifest_that_does_not_match(reference, tmp_path):
    mismatched = copy_of(reference, tmp_path / "mismatch")
    manifest = json.loads((mismatched / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["tokens"] += 1
    (mismatched / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="train_000000.bin.*manifest"):
        TokenDataset(mismatched)


def test_reading_across_shard_boundaries_matches_the_files(reference):
    ds = TokenDataset(reference)
    stream = split_tokens(reference, "train").astype(np.int64)
    assert ds.n_tokens == len(stream) == 150_000
    np.testing.assert_array_equal(ds.read(19_990, 20_030), stream[19_990:40_020])  # spans 3 shards


def test_batches_are_rows_of_the_stream_and_compose(reference):
    ds = TokenDataset(reference)
    stream = torch.from_numpy(split_tokens(reference, "train").astype(np.int64))
    B, T = 4, 1000
    big = BatchLoader(ds, 2 * B, T)
    small = BatchLoader(ds, B, T)
    rank0, rank1 = BatchLoader(ds, B, T, rank=0, world_size=2), BatchLoader(ds, B, T, rank=1, world_size=2)
    for step in range(3):
        b = big.next_batch()
        assert b.dtype == torch.int64 and b.shape == (2 * B, T + 1)
        assert torch.equal(b[0], stream[step * 2 * B * T : step * 2 * B * T + T + 1])
        assert torch.equal(b, torch.cat([small.next_batch(), small.next_batch()]))
        assert torch.equal(b, torch.cat([rank0.next_batch(), rank1.next_batch()]))


def test_ddp_ranks_cover_the_stream_without_overlap_or_gaps(reference):
    ds = TokenDataset(reference)
    B, T, world = 3, 500, 4
    loaders = [BatchLoader(ds, B, T, rank=r, world_size=world) for r in range(world)]
    starts = []
    steps = (ds.n_tokens - 1) // (B * T * world)
    for _ in range(steps):
        for loader in loaders:
            batch = loader.next_batch()
            # Find where this rank's rows start in the stream from its own position record.
            starts.append(loader.pos - B * T * world + loader.rank * B * T)
            np.testing.assert_array_equal(batch[:, :-1].reshape(-1).numpy(), ds.read(starts[-1], B * T))
    assert starts == list(range(0, steps * B * T * world, B * T)), "consecutive, disjoint, gapless"
    assert all(loader.epoch == 0 for loader in loaders)
    first = BatchLoader(ds, B, T, rank=0, world_size=world).next_batch()
    assert torch.equal(loaders[0].next_batch(), first) and loaders[0].epoch == 1, "wraps to a new epoch"


def test_saved_position_restores_exactly_and_reset_restarts(reference):
    ds = TokenDataset(reference)
    loader = BatchLoader(ds, 2, 700, rank=1, world_size=2)
    for _ in range(60):  # 53 steps per epoch: past the end of the stream, so the state carries an epoch
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [loader.next_batch() for _ in range(5)]
    resumed = BatchLoader(TokenDataset(reference), 2, 700, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert state["epoch"] >= 1
    assert all(torch.equal(resumed.next_batch(), e) for e in expected)
    fresh = BatchLoader(ds, 2, 700, rank=1, world_size=2).next_batch()
    resumed.reset()
    assert torch.equal(resumed.next_batch(), fresh)


def test_a_split_too_small_for_one_batch_is_a_clear_error(reference):
    ds = TokenDataset(reference, "val")
    with pytest.raises(ShardError, match="smaller batch"):
        BatchLoader(ds, 64, 1024)


# --- bad input -------------------------------------------------------------------------


def run_main(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def empty_corpus(path: Path) -> str:
    path.mkdir()
    (path / "a.txt").write_text("")
    (path / "b.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    return str(path)


@pytest.mark.parametrize("make_source, extra, message", [
    (lambda d: str(d / "missing"), [], "does not exist"),
    (lambda d: empty_corpus(d / "empty"), [], "no documents to train on (2 empty or filtered out)"),
    (lambda d: empty_corpus(d / "empty"), ["--workers", "2"], "no documents to train on (2 empty or filtered out)"),
    (lambda d: str(write_jsonl(d / "x.jsonl", [{"content": "hi"}])), [], "no 'text' field"),
    (lambda d: str(write_parquet(d / "x.parquet", [{"body": "hi"}])), [], "no column 'text'"),
    (lambda d: str(write_jsonl(d / "x.jsonl", [{"text": "hi"}])), ["--shard-tokens", "0"], "--shard-tokens"),
    (lambda d: str(write_jsonl(d / "x.jsonl", [{"text": "hi"}])), ["--workers", "0"], "--workers"),
    (lambda d: str(write_jsonl(d / "x.jsonl", [{"text": "hi"}])), ["--min-int-score", "9"], "--min-int-score"),
])
def test_bad_input_is_one_clear_error_and_leaves_no_output(tmp_path, capsys, make_source, extra, message):
    out = tmp_path / "out"
    code, _, err = run_main(["--source", make_source(tmp_path), "--out", str(out), "--val-tokens", "0", *extra],
                            capsys)
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("workers", ["1", "2"])  # with 2, a worker process reads the file
def test_undecodable_bytes_are_replaced_and_counted(tmp_path, capsys, workers):
    (tmp_path / "latin1.txt").write_bytes("café au lait, naïve".encode("latin-1"))
    out = tmp_path / "out"
    code, stdout, _ = run_main(["--source", str(tmp_path / "latin1.txt"), "--out", str(out),
                                "--val-tokens", "0", "--workers", workers], capsys)
    assert code == 0 and "replaced 2 undecodable" in stdout
    assert split_docs(out, "train") == ["caf\ufffd au lait, na\ufffdve"]
    assert json.loads((out / "manifest.json").read_text())["source_stats"]["replaced_characters"] == 2


def test_cli_errors_have_no_traceback_and_offline_fineweb_fails_fast(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for source in ["fineweb-edu", str(tmp_path / "nope.txt")]:
        result = subprocess.run([sys.executable, "-m", "data_prep.prepare", "--source", source,
                                 "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=120)  # offline, fineweb must fail instead of retrying the network
        assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()
    assert "--data-files" in result.stderr or "does not exist" in result.stderr


# Imports that do what they say, and the classic first corpus with default flags.
BLOCK_TORCH = """
import sys
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed (blocked by the test)")
sys.meta_path.insert(0, BlockTorch())
from data_prep.prepare import main
import data_prep.reader as _  # noqa: F401  (never reached: the reader needs torch)
"""


def test_data_prep_runs_without_torch(tmp_path):
    (tmp_path / "notes.txt").write_text("".join(f"Paragraph {i}: some words here.\n\n" for i in range(300)))
    code = BLOCK_TORCH.replace("import data_prep.reader as _  # noqa: F401  (never reached: the reader needs torch)\n", "") + \
        "sys.exit(main(sys.argv[1:]))\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code, "--source", str(tmp_path / "notes.txt"), "--out",
                             str(tmp_path / "out"), "--workers", "1", "--val-tokens", "100"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "manifest.json").is_file()
    # The blocker works: the torch-backed reader fails to import in the same setting.
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "torch is not installed" in result.stderr


def test_one_text_file_prepares_with_default_flags(tmp_path, capsys):
    source = shared_file("tinyshakespeare.txt")
    assert main(["--source", str(source), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "split into documents at blank lines" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert manifest["options"]["txt_docs"] == "paragraph"
    assert train["documents"] > 1000 and val["documents"] > 50
    assert 0.01 < val["tokens"] / (train["tokens"] + val["tokens"]) < 0.1
    # The whole file is in one split or the other: only the blank lines between paragraphs
    # (and the one EOT per document) differ from tokenising it as one text.
    text_tokens = len(get_tokenizer().encode_ordinary(source.read_text()))
    paragraphs = train["documents"] + val["documents"]
    assert 0.9 * text_tokens < train["tokens"] + val["tokens"] - paragraphs <= text_tokens
    # A directory of text files keeps one document per file.
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text("first\n\nsecond")
    assert prepare(str(tmp_path / "dir"), tmp_path / "out2", val_tokens=0, **QUIET)
    assert json.loads((tmp_path / "out2" / "manifest.json").read_text())["splits"]["train"]["documents"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_batches_are_page_locked_and_equal(shakespeare_data):
    plain = BatchLoader(TokenDataset(shakespeare_data, "train"), 4, 16)
    pinned = BatchLoader(TokenDataset(shakespeare_data, "train"), 4, 16, pin_memory=True)
    for _ in range(3):
        a, b = plain.next_batch(), pinned.next_batch()
        assert b.is_pinned() and not a.is_pinned() and torch.equal(a, b)


def test_shuffled_order_permutes_whole_sequences_and_differs_by_seed(reference):
    ds = TokenDataset(reference)
    stream = torch.from_numpy(split_tokens(reference, "train").astype(np.int64))
    B, T = 4, 1000
    n_sequences = (ds.n_tokens - 1) // T
    a, b, again = (BatchLoader(ds, B, T, order_seed=s) for s in (1, 2, 1))
    seen = []
    for _ in range(n_sequences // B):
        batch = a.next_batch()
        assert torch.equal(batch, again.next_batch()), "one seed, one order"
        seen.extend(batch)
    rows = {tuple(r.tolist()) for r in seen}
    expected = {tuple(stream[i * T : (i + 1) * T + 1].tolist()) for i in range(n_sequences)}
    assert rows <= expected and len(rows) == len(seen) == n_sequences // B * B, "whole sequences, none twice in an epoch"
    assert not torch.equal(BatchLoader(ds, B, T, order_seed=1).next_batch(), b.next_batch()), "seeds differ"
    assert not torch.equal(BatchLoader(ds, B, T, order_seed=1).next_batch(), BatchLoader(ds, B, T).next_batch())
    # Composition over the permuted sequences: 2B rows = two steps of B = ranks 0 and 1.
    big, r0, r1 = BatchLoader(ds, 2 * B, T, order_seed=3), *(BatchLoader(ds, B, T, rank=r, world_size=2, order_seed=3) for r in (0, 1))
    small = BatchLoader(ds, B, T, order_seed=3)
    for _ in range(3):
        x = big.next_batch()
        assert torch.equal(x, torch.cat([small.next_batch(), small.next_batch()]))
        assert torch.equal(x, torch.cat([r0.next_batch(), r1.next_batch()]))


def test_shuffled_order_resumes_exactly_across_epochs(reference):
    ds = TokenDataset(reference)
    loader = BatchLoader(ds, 2, 700, rank=1, world_size=2, order_seed=9)
    first_epoch = [loader.next_batch() for _ in range(53)]
    for _ in range(7):  # into the second epoch, whose order is a new permutation
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [loader.next_batch() for _ in range(5)]
    assert state["epoch"] == 1 and state["order_seed"] == 9
    assert not all(torch.equal(e, f) for e, f in zip(expected, first_epoch[7:12])), "each epoch its own order"
    resumed = BatchLoader(TokenDataset(reference), 2, 700, rank=1, world_size=2, order_seed=9)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(), e) for e in expected)
    with pytest.raises(ShardError, match="data order seed 9"):
        BatchLoader(ds, 2, 700, rank=1, world_size=2, order_seed=8).load_state_dict(state)
    with pytest.raises(ShardError, match="data order seed 9"):
        BatchLoader(ds, 2, 700, rank=1, world_size=2).load_state_dict(state)


def test_workers_are_not_forked_from_a_process_running_other_threads(tmp_path):
    """A fork while another thread holds a lock leaves the child waiting forever (it hung
    the suite once SAELens / nnsight had left threads behind): with a second thread alive,
    the tokenising workers start with forkserver, and preparing still gives the same shards."""
    import threading

    from data_prep.encode import start_method
    from data_prep.prepare import prepare

    assert start_method() == "fork" or threading.active_count() > 1
    release = threading.Event()
    thread = threading.Thread(target=release.wait, daemon=True)
    thread.start()
    try:
        assert start_method() in ("forkserver", "spawn")
        kw = dict(max_tokens=200_000, val_tokens=10_000, progress=False, log=lambda *a: None)
        threaded = prepare("python-stdlib", tmp_path / "threaded", workers=2, **kw)
    finally:
        release.set()
    single = prepare("python-stdlib", tmp_path / "single", workers=1, **kw)
    names = sorted(p.name for p in single.glob("*.bin"))
    assert names == ["train_000000.bin", "val_000000.bin"]
    for name in names:
        assert (threaded / name).read_bytes() == (single / name).read_bytes(), name
