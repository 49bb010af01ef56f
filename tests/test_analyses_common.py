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
