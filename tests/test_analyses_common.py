"""analyses.common: token windows of prepared data, read through data_prep.reader."""

import numpy as np
import pytest

from analyses.common import load_split_batch
from data_prep.prepare import prepare
from data_prep.reader import ShardError, TokenDataset


def test_split_batches_cross_shards_and_check_the_data(tmp_path):
    (tmp_path / "docs.txt").write_text("".join(f"Paragraph {i} says {i * 7} things.\n\n" for i in range(200)))
    data = prepare(str(tmp_path / "docs.txt"), tmp_path / "data", val_tokens=400, val_every=2, shard_tokens=300,
                   progress=False, log=lambda *a: None)
    assert len(list(data.glob("val_*.bin"))) >= 2, "the test needs several val shards"
    batch = load_split_batch(data, "val", batch=16, seq_len=64, seed=0)
    stream = TokenDataset(data, "val").read(0, len(TokenDataset(data, "val")))
    starts = np.random.default_rng(0).integers(0, len(stream) - 64, size=16)
    assert batch.tolist() == [stream[s : s + 64].tolist() for s in starts]
    assert max(starts) + 64 > 300, "some windows come from past the first shard"
    (data / "manifest.json").unlink()
    with pytest.raises(ShardError, match="manifest.json does not exist"):
        load_split_batch(data, "val")


def test_a_relative_checkpoint_is_found_from_the_launch_directory(tmp_path, monkeypatch):
    from analyses.common import AnalysisError, launch_dir_path

    (tmp_path / "runs" / "ckpt").mkdir(parents=True)
    notebook_folder = tmp_path / "analyses" / "notebooks"
    notebook_folder.mkdir(parents=True)
    monkeypatch.chdir(notebook_folder)  # where a kernel runs
    monkeypatch.setenv("PWD", str(tmp_path))  # where Jupyter was launched
    assert launch_dir_path("runs/ckpt") == tmp_path / "runs" / "ckpt"
    assert launch_dir_path(tmp_path / "runs") == tmp_path / "runs"
    with pytest.raises(AnalysisError, match=r"tried .*runs/nope or .*notebooks/runs/nope; give an absolute path"):
        launch_dir_path("runs/nope")


def test_attention_views_refuse_a_cache_or_labels_of_another_prompt(tiny_model):
    from analyses import attention
    from analyses.common import AnalysisError
    from analyses.html import Page

    tokens, other = tiny_model.to_tokens("The cat sat on the mat"), tiny_model.to_tokens("When Mary and John went")
    _, cache = tiny_model.run_with_cache(tokens)
    with pytest.raises(AnalysisError, match="cache holds a run of 7 tokens but tokens has 6"):
        attention.attention_patterns(tiny_model, other, cache=cache)
    patterns = attention.attention_patterns(tiny_model, tokens, cache=cache)
    with pytest.raises(AnalysisError, match="covers 7 tokens but 6 labels"):
        attention.add_to_page(Page("x"), tiny_model.to_str_tokens(other), patterns)
