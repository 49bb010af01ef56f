"""Training sequences that repeat a span: the data that makes induction heads form quickly.

A model predicts the second occurrence of a span by attending to what followed the
first: an induction head. Natural text repeats too rarely for a small run to learn
this within minutes (Bi-Induct, arXiv 2509.22947, and ``docs/induction-recipe.md``), so
``RepeatedSpans`` replaces a stated fraction of a loader's rows with a span of
up to ``span`` tokens drawn from the corpus's own most frequent tokens, written out again and
again to fill the row. Span lengths vary (uniform from 2 to ``span``) so that no fixed
offset predicts the repeat: only attending to what followed the current token's last
occurrence does. The tokens come from the training split's distribution (not
from all 50,257 ids, most of which a small corpus never shows the model).

    loader = RepeatedSpans(BatchLoader(TokenDataset(data, "train"), 16, 128), fraction=0.5,
                           vocab=frequent_tokens(TokenDataset(data, "train"), 2000), seed=0)
    batch = loader.next_batch()  # half its rows are [r_1..r_L, r_1..r_L, ...]

The choice of rows and tokens is a function of the seed and the loader's position, so a
resumed run sees exactly the batches it would have seen.
"""

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from .reader import BatchLoader, TokenDataset


def frequent_tokens(dataset: TokenDataset, k: int) -> Int[Tensor, " k"]:
    """The ``k`` most frequent token ids of ``dataset``, most frequent first (ties by id).

    >>> frequent_tokens(TokenDataset("data/python-stdlib", "train"), 3)  # doctest: +SKIP
    tensor([220, 198, 25])
    """
    counts = np.zeros(65536, dtype=np.int64)
    for shard in dataset.shards:
        counts += np.bincount(shard, minlength=65536)
    present = int((counts > 0).sum())
    order = np.argsort(-counts, kind="stable")[: min(k, present)]
    return torch.from_numpy(order.astype(np.int64))


class RepeatedSpans:
    """A ``BatchLoader`` whose rows are, with probability ``fraction`` each, a span of 2 to
    ``span`` tokens (length uniform) drawn without replacement from ``vocab``, repeated to fill the row."""

    def __init__(self, loader: BatchLoader, fraction: float, vocab: Int[Tensor, " n"], span: int, seed: int):
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if not 2 <= span <= len(vocab):
            raise ValueError(f"span must be in [2, {len(vocab)}] (distinct tokens from vocab), got {span}")
        self.loader, self.fraction, self.vocab, self.span, self.seed = loader, fraction, vocab, span, seed

    def next_batch(self) -> Int[Tensor, "batch pos"]:
        rng = np.random.default_rng([self.seed, self.loader.epoch, self.loader.pos, self.loader.rank])
        batch = self.loader.next_batch()
        n_rows, width = batch.shape
        for row in np.flatnonzero(rng.random(n_rows) < self.fraction):
            length = int(rng.integers(2, self.span + 1))
            span = self.vocab[torch.from_numpy(rng.permutation(len(self.vocab))[:length])]
            batch[row] = span.repeat(-(-width // length))[:width]
        return batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
