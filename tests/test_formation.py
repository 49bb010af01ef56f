"""analyses.formation and data_prep.repeats: K-composition against TransformerLens on the
same weights, the natural-text ICL score against a per-sequence loop, crossings and views
picked from hand-made rows, and repeated-span batches checked row by row."""

import collections

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analyses import formation
from data_prep.reader import BatchLoader, TokenDataset
from data_prep.repeats import RepeatedSpans, frequent_tokens
from hooked_gpt2 import GPT2Config, HookedGPT2
from tests.planted import INDUCTION_HEAD, PREV_HEAD, build_planted_induction_model


def _transformer_lens_copy(model: HookedGPT2):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = model.cfg
    tl = HookedTransformer(HookedTransformerConfig(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_model // cfg.n_heads,
        n_ctx=cfg.n_ctx, d_vocab=cfg.d_vocab, attn_only=True, act_fn="gelu_new", normalization_type="LN"))
    with torch.no_grad():
        for block, mine in zip(tl.blocks, model.blocks):
            for name in ("W_Q", "W_K", "W_V", "W_O"):
                getattr(block.attn, name).copy_(getattr(mine.attn, name))
    return tl


@pytest.mark.parametrize("which", ["planted", "random"])
def test_k_composition_matches_transformer_lens(which):
    torch.manual_seed(0)
    model = (build_planted_induction_model() if which == "planted" else
             HookedGPT2(GPT2Config(n_layers=2, d_model=32, n_heads=4, n_ctx=16, d_vocab=50, attn_only=True)))
    ours = formation.k_composition(model)
    reference = _transformer_lens_copy(model).all_composition_scores("K")[0, :, 1, :]  # [L0 head, L1 head]
    # TransformerLens reads the raw weights: equal when the layer-norm gains are 1 (both models here).
    # It divides 0 by 0 for an all-zero head, where we report 0.
    reference = reference.detach().float()
    defined = reference.isfinite()
    assert torch.allclose(ours[defined], reference[defined], atol=1e-5), (ours, reference)
    assert (ours[~defined] == 0).all()
    if which == "planted":  # only the previous-token head feeds the induction head's keys
        assert defined.sum() == 1 and defined[PREV_HEAD[1], INDUCTION_HEAD[1]] and ours[0, 0] > 0.05
    else:
        assert defined.all()


def test_k_composition_folds_layer_norm_gains():
    torch.manual_seed(1)
    model = HookedGPT2(GPT2Config(n_layers=2, d_model=16, n_heads=2, n_ctx=8, d_vocab=20, attn_only=True))
    with torch.no_grad():
        for block in model.blocks:
            block.ln1.weight.uniform_(0.2, 3.0)
    g0, g1 = model.blocks[0].ln1.weight, model.blocks[1].ln1.weight
    scores = formation.k_composition(model)
    for s in range(2):
        ov = torch.diag(g0) @ model.blocks[0].attn.W_V[s] @ model.blocks[0].attn.W_O[s]
        for r in range(2):
            qk = torch.diag(g1) @ model.blocks[1].attn.W_Q[r] @ model.blocks[1].attn.W_K[r].T @ torch.diag(g1)
            expected = torch.linalg.matrix_norm(qk @ ov.T) / torch.linalg.matrix_norm(qk) / torch.linalg.matrix_norm(ov)
            assert scores[s, r].item() == pytest.approx(expected.item(), rel=1e-4)


def test_text_icl_is_late_minus_early_loss():
    torch.manual_seed(2)
    model = HookedGPT2(GPT2Config(n_layers=1, d_model=16, n_heads=2, n_ctx=40, d_vocab=30)).eval()
    windows = torch.randint(0, 30, (3, 41))
    result = formation.text_icl(model, windows)
    per_seq = torch.stack([F.cross_entropy(model(w[None, :-1])[0], w[1:], reduction="none") for w in windows])
    by_pos = per_seq.mean(0).detach()  # 40 target positions; early ends at 40 // 10 = 4 -> first 5 positions
    assert result["icl_text_positions"] == [1, 5, 36, 40]
    assert result["icl_text"] == pytest.approx((by_pos[-5:].mean() - by_pos[:5].mean()).item(), abs=1e-5)


def _rows(prev, ind):
    """Rows for one layer of two heads each: prev/ind are [step][head] scores."""
    return [{"step": 10 * i, "heads": {"previous_token": [p], "induction": [q]}} for i, (p, q) in enumerate(zip(prev, ind))]


def test_first_crossings_and_view_steps():
    rows = _rows(prev=[[0.1, 0.0], [0.6, 0.0], [0.4, 0.2], [0.9, 0.1]],
                 ind=[[0.0, 0.1], [0.0, 0.2], [0.0, 0.6], [0.1, 0.9]])
    assert formation.first_crossings(rows, "previous_token", 0.5) == {"L0H0": 10, "L0H1": None}
    assert formation.first_crossings(rows, "induction", 0.5) == {"L0H0": None, "L0H1": 20}
    assert formation.best_head(rows[-1], "induction") == (0, 1)
    # before: the last checkpoint below half the threshold (0.2 at step 10)
    assert formation.view_steps(rows, (0, 1), 0.5) == [("before", 10), ("during", 20), ("after", 30)]
    assert formation.view_steps(rows, (0, 0), 0.5) == [("first", 0), ("middle", 20), ("last", 30)]


@pytest.fixture(scope="module")
def train_split(shakespeare_data):
    return TokenDataset(shakespeare_data, "train")


def test_frequent_tokens_match_a_counter(train_split):
    counts = collections.Counter(np.concatenate([np.asarray(s) for s in train_split.shards]).tolist())
    expected = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:50]]
    assert frequent_tokens(train_split, 50).tolist() == expected


def test_repeated_spans_replace_the_stated_fraction_with_repeats(train_split):
    vocab = frequent_tokens(train_split, 100)
    plain = BatchLoader(train_split, 64, 32)
    loader = RepeatedSpans(BatchLoader(train_split, 64, 32), 0.5, vocab, span=8, seed=3)
    n_repeated, lengths = 0, set()
    for _ in range(5):
        original, batch = plain.next_batch(), loader.next_batch()
        for row, orig in zip(batch, original):
            if torch.equal(row, orig):
                continue
            n_repeated += 1
            # [span, span, the row's own text from there on], the span 4 to 8 distinct frequent tokens.
            length = next(n for n in range(4, 9) if torch.equal(row[:n], row[n : 2 * n])
                          and len(set(row[:n].tolist())) == n)
            assert set(row[:length].tolist()) <= set(vocab.tolist())
            assert torch.equal(row[2 * length :], orig[2 * length :])
            lengths.add(length)
    assert 0.35 < n_repeated / 320 < 0.65
    assert lengths == set(range(4, 9))  # every length from span // 2 to span occurs
    # The same seed and position give the same batches: a resumed run sees what it would have.
    state = loader.state_dict()
    after = loader.next_batch()
    again = RepeatedSpans(BatchLoader(train_split, 64, 32), 0.5, vocab, span=8, seed=3)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(), after)
    none = RepeatedSpans(BatchLoader(train_split, 4, 32), 0.0, vocab, span=8, seed=3)
    assert torch.equal(none.next_batch(), BatchLoader(train_split, 4, 32).next_batch())


def test_loss_around_the_crossing_reads_the_checkpoints_and_measures_the_rise():
    from analyses.formation import loss_around

    rows = [{"step": s, "val_loss": v} for s, v in [(0, 7.0), (100, 4.0), (200, 3.9), (300, 3.5), (400, 3.7)]]
    got = loss_around(rows, {"before": 100, "during": 200, "after": 400})
    assert got["before"] == {"step": 100, "val_loss": 4.0} and got["after"]["val_loss"] == 3.7
    assert got["lowest_after"] == 3.5 and got["rise"] == pytest.approx(0.2)  # 3.7 at the end, 3.5 at its lowest
    falling = [{**r, "val_loss": 5.0 - r["step"] / 100} for r in rows]
    assert loss_around(falling, {"before": 0, "during": 100, "after": 400})["rise"] == 0
    assert loss_around(rows, {"first": 0, "middle": 200, "last": 400}) is None  # no crossing
    assert loss_around([{**r, "val_loss": None} for r in rows], {"before": 0, "during": 100, "after": 400}) is None
