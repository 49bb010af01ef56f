"""Training sequences that repeat a span: the data that makes induction heads form quickly.

A model predicts the second occurrence of a span by attending to what followed the
first: an induction head. Natural text repeats too rarely for a small run to learn
this within minutes (Bi-Induct, arXiv 2509.22947, and ``docs/induction-recipe.md``), so
``RepeatedSpans`` starts a stated fraction of a loader's rows with a span of distinct
tokens drawn from the corpus's own most frequent tokens, written twice, after which the
row's natural text goes on: ``[r_1..r_L, r_1..r_L, natural...]``. Span lengths vary
(uniform from ``span // 2`` to ``span``) so that no fixed offset predicts the repeat: only
attending to what followed the current token's earlier occurrence does. (Writing the span
again and again to fill the row, as this module first did, lets a model with rotary
positions learn one fixed-offset copying head per period instead; the experiments are in
``docs/induction-recipe.md``.) The tokens come from the training split's distribution (not
from all 50,257 ids, most of which a small corpus never shows the model).

    loader = RepeatedSpans(BatchLoader(TokenDataset(data, "train"), 32, 32), fraction=0.75,
                           vocab=frequent_tokens(TokenDataset(data, "train"), 256), span=16, seed=0)
    batch = loader.next_batch()  # three rows in four are [r_1..r_L, r_1..r_L, natural text...]

The choice of rows and tokens is a function of the seed and the loader's position, so a
resumed run sees exactly the batches it would have seen.
"""

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from hooked_gpt2.tokenizer import OTHER

from .compact import most_frequent, token_counts
from .reader import BatchLoader, TokenDataset


def frequent_tokens(dataset: TokenDataset, k: int) -> Int[Tensor, " k"]:
    """The ``k`` most frequent token ids of ``dataset``, most frequent first (ties by id);
    in a compact vocabulary, never the id that stands for every other token.

    >>> frequent_tokens(TokenDataset("data/python-stdlib", "train"), 3)  # doctest: +SKIP
    tensor([220, 198, 25])
    """
    other = dataset.vocab.index(OTHER) if dataset.vocab is not None else None
    return torch.tensor(most_frequent(token_counts(dataset), k, exclude=other), dtype=torch.int64)


class RepeatedSpans:
    """A ``BatchLoader`` whose rows start, with probability ``fraction`` each, with a span of
    ``span // 2`` to ``span`` tokens (length uniform) drawn without replacement from ``vocab``,
    written twice; the rest of the row is the loader's text."""

    def __init__(self, loader: BatchLoader, fraction: float, vocab: Int[Tensor, " n"], span: int, seed: int):
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if not 2 <= span <= len(vocab):
            raise ValueError(f"span must be in [2, {len(vocab)}] (distinct tokens from vocab), got {span}")
        if 2 * span > loader.seq_len + 1:
            raise ValueError(f"span {span} written twice does not fit a row of {loader.seq_len + 1} tokens; "
                             f"use a span of at most {(loader.seq_len + 1) // 2}")
        self.loader, self.fraction, self.vocab, self.span, self.seed = loader, fraction, vocab, span, seed

    def next_batch(self) -> Int[Tensor, "batch pos"]:
        rng = np.random.default_rng([self.seed, self.loader.epoch, self.loader.pos, self.loader.rank])
        batch = self.loader.next_batch()
        n_rows, width = batch.shape
        for row in np.flatnonzero(rng.random(n_rows) < self.fraction):
            length = int(rng.integers(max(2, self.span // 2), self.span + 1))
            span = self.vocab[torch.from_numpy(rng.permutation(len(self.vocab))[:length])]
            batch[row, :length] = span
            batch[row, length : 2 * length] = span
        return batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
