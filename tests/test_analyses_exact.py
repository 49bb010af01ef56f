"""Exact known answers for every analysis result, each computed here without the code
under test: detector scores on hand-built one-hot patterns, ablation and patching
against interventions written out as plain hooks, direct logit attribution and the
logit lens against the layer norm and unembedding applied by hand.

The random ``tiny_model`` is used where every head must matter (all of its heads have
non-zero weights); the planted induction model where the answer is known by design.
Patching runs in float64 so that normalising by a small clean-corrupted gap does not
magnify rounding."""

import math

import pytest
import torch
import torch.nn.functional as F

from analyses.ablation import ablate, head_ablation
from analyses.common import logit_diff
from analyses.dla import direct_logit_attribution
from analyses.heads import repeated_random_tokens, scores_from_patterns
from analyses.logit_lens import logit_lens
from analyses.patching import activation_patching, attribution_patching
from tests.planted import INDUCTION_HEAD, PREV_HEAD
from tests.reference_gpt2 import make_model

PROMPT = "The quick brown fox jumps over the lazy dog"


def ce(logits, tokens) -> float:
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), tokens[:, 1:].flatten()))


# Head detectors on hand-built patterns.
TOKENS = torch.tensor([[5, 1, 2, 3, 1, 2, 3]])  # BOS-like 5, then 1 2 3 twice


def one_hot_pattern(keys: list[int]) -> torch.Tensor:
    """A [query key] pattern attending from query q to keys[q] only."""
    pattern = torch.zeros(len(keys), len(keys))
    pattern[torch.arange(len(keys)), torch.tensor(keys)] = 1.0
    return pattern


def hand_patterns() -> torch.Tensor:
    uniform = torch.tril(torch.ones(7, 7))
    heads = [
        one_hot_pattern([0, 0, 1, 2, 3, 4, 5]),  # previous token
        one_hot_pattern([0, 1, 2, 3, 1, 2, 3]),  # duplicate token (itself where there is none)
        one_hot_pattern([0, 1, 2, 3, 4, 5, 6]),  # itself
        one_hot_pattern([0, 0, 0, 0, 2, 3, 4]),  # induction, BOS where there is none
        uniform / uniform.sum(-1, keepdim=True),  # uniform over the causal prefix
    ]
    return torch.stack(heads)[None, None]  # [layer batch head query key]


def test_detector_scores_on_hand_built_patterns_are_exact():
    scores = scores_from_patterns(hand_patterns(), TOKENS)
    # Previous-token: queries 1..6. Duplicate-token and induction: queries 4, 5, 6 (the
    # second 1 2 3), whose duplicate keys are 1 2 3 and induction keys 2 3 4.
    third = (1 / 5 + 1 / 6 + 1 / 7) / 3
    expected = {
        "previous_token": [1.0, 0.0, 0.0, 1 / 6, sum(1 / (q + 1) for q in range(1, 7)) / 6],
        "duplicate_token": [0.0, 1.0, 0.0, 0.0, third],
        "induction": [0.0, 0.0, 0.0, 1.0, third],
    }
    for name, values in expected.items():
        torch.testing.assert_close(scores[name][0], torch.tensor(values), atol=1e-6, rtol=0, msg=name)


def slow_scores(patterns, tokens) -> dict[str, torch.Tensor]:
    """The detectors' definitions, one query at a time: the pooled mean over every
    (sequence, query) where a key is named, of the attention on the named keys."""
    L, B, H, P, _ = patterns.shape
    out = {}
    for name in ("previous_token", "duplicate_token", "induction"):
        total, count = torch.zeros(L, H, dtype=torch.float64), 0
        for b in range(B):
            t = tokens[b].tolist()
            for q in range(P):
                if name == "previous_token":
                    keys = [q - 1] if q >= 1 else []
                elif name == "duplicate_token":
                    keys = [k for k in range(q) if t[k] == t[q]]
                else:
                    keys = [k for k in range(1, q + 1) if t[k - 1] == t[q]]
                if keys:
                    total += patterns[:, b, :, q, keys].double().sum(-1)
                    count += 1
        out[name] = total / count
    return out


def test_detector_scores_on_random_patterns_equal_their_definitions():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4, (3, 12), generator=generator)  # few token ids: many repeats
    scores = torch.rand(2, 3, 2, 12, 12, generator=generator).masked_fill(torch.ones(12, 12).triu(1).bool(), -1e9)
    patterns = scores.softmax(-1)
    got, expected = scores_from_patterns(patterns, tokens), slow_scores(patterns, tokens)
    for name in expected:
        torch.testing.assert_close(got[name].double(), expected[name], atol=1e-6, rtol=0, msg=name)


def test_repeated_random_tokens_put_duplicates_n_back_and_induction_n_minus_1_back(planted):
    n = 6
    tokens = repeated_random_tokens(planted, seq_len=n, batch=2)
    P = 2 * n + 1
    for name, back in (("duplicate_token", n), ("induction", n - 1)):
        keys = [(q - back) if q > n else 0 for q in range(P)]
        pattern = one_hot_pattern(keys)[None, None, None].expand(1, 2, 1, P, P)
        assert scores_from_patterns(pattern, tokens)[name].item() == pytest.approx(1.0), name


# Ablation on a model whose heads all matter.


@pytest.fixture(scope="module")
def ablation_setup(tiny_model):
    tokens = tiny_model.to_tokens(PROMPT)
    generator = torch.Generator().manual_seed(5)
    reference = torch.randint(0, 50257, (3, tokens.shape[1]), generator=generator)
    _, ref_cache = tiny_model.run_with_cache(reference)
    _, one_cache = tiny_model.run_with_cache(reference[:1])
    return tokens, reference, ref_cache, one_cache


def hand_replacement(method, ref_cache, one_cache, name):
    """What replaces an activation, written out: zeros, the reference batch's mean over
    sequences and positions, or the single reference sequence's own values."""
    if method == "zero":
        return lambda act: torch.zeros_like(act)
    if method == "mean":
        return lambda act: ref_cache[name].mean(dim=(0, 1), keepdim=True).expand_as(act)
    return lambda act: one_cache[name][:, : act.shape[1]].expand_as(act)


def run_edited(model, tokens, name, edit):
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(name, lambda act, hook: edit(act.clone()))])


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_head_and_mlp_ablation_equal_hand_written_replacements(tiny_model, ablation_setup, method):
    tokens, reference, ref_cache, one_cache = ablation_setup
    # Resampling from a single reference sequence leaves no choice of row.
    ref_tokens = reference[:1] if method == "resample" else reference
    result = head_ablation(tiny_model, tokens, method, reference_tokens=ref_tokens)
    clean = ce(tiny_model(tokens).detach(), tokens)
    assert result.clean == pytest.approx(clean, abs=1e-5)
    for layer in range(tiny_model.cfg.n_layers):
        name = f"blocks.{layer}.attn.hook_z"
        new = hand_replacement(method, ref_cache, one_cache, name)
        for head in range(tiny_model.cfg.n_heads):

            def edit(z, head=head):
                z[:, :, head] = new(z)[:, :, head]
                return z

            expected = ce(run_edited(tiny_model, tokens, name, edit), tokens) - clean
            assert result.heads[layer, head].item() == pytest.approx(expected, abs=2e-5), (method, layer, head)
        mlp = f"blocks.{layer}.hook_mlp_out"
        expected = ce(run_edited(tiny_model, tokens, mlp, hand_replacement(method, ref_cache, one_cache, mlp)), tokens)
        assert result.mlps[layer].item() == pytest.approx(expected - clean, abs=2e-5), (method, layer)
    assert result.heads.abs().min() > 1e-4, "every head matters in this model"


def test_ablation_methods_give_different_answers_and_heads_ablate_together(tiny_model, ablation_setup):
    tokens, reference, ref_cache, one_cache = ablation_setup
    values = {m: ablate(tiny_model, tokens, heads=[(0, 1), (1, 3)], method=m,
                        reference_tokens=reference[:1] if m == "resample" else reference)
              for m in ("zero", "mean", "resample")}
    for method, value in values.items():
        edits = {}
        for layer, head in [(0, 1), (1, 3)]:
            name = f"blocks.{layer}.attn.hook_z"
            new = hand_replacement(method, ref_cache, one_cache, name)
            edits[name] = lambda z, head=head, new=new: z.index_copy(2, torch.tensor([head]), new(z)[:, :, [head]])
        with torch.no_grad():
            logits = tiny_model.run_with_hooks(tokens, fwd_hooks=[(n, lambda a, hook, f=f: f(a)) for n, f in edits.items()])
        assert value == pytest.approx(ce(logits, tokens), abs=1e-5), method
    assert len({round(v, 4) for v in values.values()}) == 3, values


# Patching: every kind against the patch written out as a hook, with the metric's clean
# value above and below its corrupted value.
HAND_PATCHES = {  # kind -> (hook suffix, index into the activation after the batch axis)
    "resid_pre": ("hook_resid_pre", "pos"),
    "attn_out": ("hook_attn_out", "pos"),
    "mlp_out": ("hook_mlp_out", "pos"),
    "head_out": ("attn.hook_z", "head"),
    "head_out_by_pos": ("attn.hook_z", "pos_head"),
    "q": ("attn.hook_q", "head"),
    "k": ("attn.hook_k", "head"),
    "v": ("attn.hook_v", "head"),
    "pattern": ("attn.hook_pattern", "pattern_head"),
}


def hand_patching(model, clean_cache, clean, corrupted, metric, kind) -> torch.Tensor:
    suffix, cover = HAND_PATCHES[kind]
    with torch.no_grad():
        value_clean, value_corrupted = float(metric(model(clean))), float(metric(model(corrupted)))
    L, H, P = model.cfg.n_layers, model.cfg.n_heads, clean.shape[1]
    shape = {"pos": (L, P), "head": (L, H), "pattern_head": (L, H), "pos_head": (L, P, H)}[cover]
    out = torch.zeros(shape, dtype=torch.float64)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in shape)).tolist():
        layer, *rest = index
        name = f"blocks.{layer}.{suffix}"
        source = clean_cache[name]

        def patch(act, hook, rest=rest):
            act = act.clone()
            if cover == "pos":
                act[:, rest[0]] = source[:, rest[0]]
            elif cover == "head":  # [batch pos head d_head]
                act[:, :, rest[0]] = source[:, :, rest[0]]
            elif cover == "pattern_head":  # [batch head query key]
                act[:, rest[0]] = source[:, rest[0]]
            else:
                act[:, rest[0], rest[1]] = source[:, rest[0], rest[1]]
            return act

        with torch.no_grad():
            value = float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])))
        out[tuple(index)] = (value - value_corrupted) / (value_clean - value_corrupted)
    return out


@pytest.fixture(scope="module")
def small():
    """A 2-layer model with a 100-token vocabulary (d_head != d_model / n_heads), in float64."""
    return make_model(n_layers=2).double()


def random_tokens(batch, pos, seed):
    return torch.randint(0, 100, (batch, pos), generator=torch.Generator().manual_seed(seed))


def test_every_patching_kind_equals_the_patch_written_out_for_either_sign_of_the_gap(small):
    clean = random_tokens(1, 6, seed=2)
    corrupted = clean.clone()
    corrupted[0, [1, 3]] = (corrupted[0, [1, 3]] + 1) % 100
    diff = logit_diff(3, 5)
    with torch.no_grad():
        assert abs(float(diff(small(clean)) - diff(small(corrupted)))) > 0.1, "the corruption moves the metric"
    results = activation_patching(small, clean, corrupted, diff, max_copies=7)
    assert set(results) == set(HAND_PATCHES)
    _, clean_cache = small.run_with_cache(clean)
    for kind in HAND_PATCHES:
        expected = hand_patching(small, clean_cache, clean, corrupted, diff, kind)
        torch.testing.assert_close(results[kind], expected, atol=1e-9, rtol=1e-9, msg=kind)
    # With the metric negated its clean value is below the corrupted one; normalised
    # results do not change.
    flipped = activation_patching(small, clean, corrupted, lambda logits: -diff(logits))
    for kind in HAND_PATCHES:
        torch.testing.assert_close(flipped[kind], results[kind], atol=1e-9, rtol=1e-9, msg=kind)


def planted_pair(model, corrupt: int, seq_len: int = 10):
    """Repeated random tokens with one first-half token replaced; the metric is the
    induction prediction at the second-to-last position (the clean token that followed
    the query's first occurrence, against an unused token)."""
    clean = repeated_random_tokens(model, seq_len=seq_len, batch=1, seed=0)
    unused = [t for t in range(model.cfg.d_vocab - 1) if t not in clean[0].tolist()]
    corrupted = clean.clone()
    corrupted[0, corrupt] = unused[0]
    return clean, corrupted, logit_diff(int(clean[0, seq_len]), unused[1], pos=-2)


# The planted model (L0H0 previous-token, L1H0 induction; other heads write nothing). The
# query is a9 at the second-to-last position; the answer a10 sits at position 10.
# - corrupting position 10 (a10): L1H0's value there is wrong; its key (previous token
#   a9) is intact, so only L1H0's value and output restore the answer;
# - corrupting position 9 (a9): position 10's previous token, written by L0H0 from its
#   value at 9, no longer matches the query: L0H0's value and output, and L1H0's key and
#   pattern, restore it; L1H0's value (a10 at position 10) is the same in both runs.
PLANTED_ANSWERS = {
    10: {"head_out": {INDUCTION_HEAD: 1}, "q": {}, "k": {}, "v": {INDUCTION_HEAD: 1}, "pattern": {}},
    9: {"head_out": {PREV_HEAD: 1, INDUCTION_HEAD: 1}, "q": {}, "k": {INDUCTION_HEAD: 1},
        "v": {PREV_HEAD: 1}, "pattern": {INDUCTION_HEAD: 1}},
}


@pytest.mark.parametrize("corrupt", [10, 9])
@pytest.mark.parametrize("sign", [1, -1], ids=["clean-above", "clean-below"])
def test_planted_patching_answers_by_kind(planted, corrupt, sign):
    clean, corrupted, diff = planted_pair(planted, corrupt)
    metric = (lambda logits: sign * diff(logits))
    results = activation_patching(planted, clean, corrupted, metric)
    for kind, ones in PLANTED_ANSWERS[corrupt].items():
        expected = torch.zeros(planted.cfg.n_layers, planted.cfg.n_heads, dtype=torch.float64)
        for head, value in ones.items():
            expected[head] = value
        torch.testing.assert_close(results[kind], expected, atol=0.03, rtol=0, msg=f"{kind} corrupting {corrupt}")
    # The residual stream carries everything at the corrupted position before layer 0,
    # and at the query's position only what is computed there (nothing, for position 9).
    assert results["resid_pre"][0, corrupt] == pytest.approx(1.0, abs=0.03)
    assert results["resid_pre"][0, -2] == pytest.approx(0.0, abs=0.03)
    approx = attribution_patching(planted, clean, corrupted, metric, kinds=["head_out"])
    assert torch.sign(approx["head_out"][INDUCTION_HEAD]) == 1, "attribution is normalised by the signed gap too"


# Direct logit attribution and the logit lens, by hand.


@torch.no_grad()
def test_each_heads_dla_is_its_result_through_ln_final_and_the_unembedding(small):
    model = small
    tokens = random_tokens(2, 9, seed=3)
    answer, wrong = 7, 11
    _, cache = model.run_with_cache(tokens)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, -1]  # [batch d_model]
    scale = (final.var(-1, unbiased=False, keepdim=True) + model.cfg.layer_norm_eps).sqrt()
    direction = (model.W_U[:, answer] - model.W_U[:, wrong]).detach()
    w = model.ln_final.weight.detach()

    def through_ln(x):  # one component's share of ln_final's output, dotted with the direction
        return float((((x - x.mean(-1, keepdim=True)) / scale * w) @ direction).mean())

    result = direct_logit_attribution(model, tokens, answer, wrong)
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][:, -1]  # [batch head d_head]
        W_O = model.blocks[layer].attn.out.weight.detach()  # [d_model head*d_head]
        for head in range(model.cfg.n_heads):
            d = model.cfg.d_head
            head_result = z[:, head] @ W_O[:, head * d:(head + 1) * d].T
            assert result.heads[layer, head].item() == pytest.approx(through_ln(head_result), abs=1e-7), (layer, head)
        mlp = cache[f"blocks.{layer}.hook_mlp_out"][:, -1]
        assert result.mlps[layer].item() == pytest.approx(through_ln(mlp), abs=1e-7)
    assert result.other["embed"] == pytest.approx(through_ln(cache["hook_embed"][:, -1]), abs=1e-7)
    assert result.other["pos_embed"] == pytest.approx(through_ln(cache["hook_pos_embed"][:, -1]), abs=1e-7)
    biases = sum(block.attn.out.bias.detach() for block in model.blocks)
    assert result.other["attn_biases"] == pytest.approx(through_ln(biases[None].expand_as(final)), abs=1e-7)
    assert result.other["ln_final_bias"] == pytest.approx(float(model.ln_final.bias @ direction), abs=1e-7)
    assert result.heads.abs().min() > 1e-6, "every head contributes, so a transposed map would show"


@pytest.mark.parametrize("site", ["pre", "mid", "post", "all"])
def test_logit_lens_at_every_layer_equals_ln_final_and_unembed_by_hand(small, site):
    model = small
    tokens = random_tokens(2, 9, seed=4)
    _, cache = model.run_with_cache(tokens)
    L = model.cfg.n_layers
    names = {
        "pre": [f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post"],
        "mid": [f"blocks.{l}.hook_resid_mid" for l in range(L)],
        "post": [f"blocks.{l}.hook_resid_post" for l in range(L)],
        "all": [f"blocks.{l}.hook_resid_{k}" for l in range(L) for k in ("pre", "mid")] + [f"blocks.{L - 1}.hook_resid_post"],
    }[site]
    result = logit_lens(model, tokens, site=site, top_k=3)
    assert len(result.labels) == len(names) == result.loss.shape[0]
    for i, name in enumerate(names):
        resid = cache[name]
        normed = F.layer_norm(resid, (model.cfg.d_model,), model.ln_final.weight, model.ln_final.bias,
                              model.cfg.layer_norm_eps)
        log_probs = (normed @ model.unembed.weight.T).log_softmax(-1)
        target = log_probs[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
        assert result.loss[i].item() == pytest.approx(float(-target.mean()), abs=1e-6), (site, name)
        torch.testing.assert_close(result.target_prob[i].double(), target.exp(), atol=1e-6, rtol=1e-6)
        ranks = (log_probs[:, :-1] > target[..., None]).sum(-1)
        assert torch.equal(result.target_rank[i], ranks), name
        top = log_probs.topk(3, dim=-1)
        assert torch.equal(result.top_tokens[i], top.indices), name
        torch.testing.assert_close(result.top_probs[i].double(), top.values.exp(), atol=1e-6, rtol=1e-6)
    # Layers differ, so a lens that read the same stream at every layer would show.
    assert len({round(float(v), 6) for v in result.loss}) == len(names)


# Mutants that survived the first mutation run (docs/testing.md), killed here.


def test_single_token_accepts_every_id_in_range_and_refuses_the_rest(tiny_model):
    from analyses.common import AnalysisError, single_token

    d_vocab = tiny_model.cfg.d_vocab
    assert single_token(tiny_model, 0) == 0 and single_token(tiny_model, d_vocab - 1) == d_vocab - 1
    assert single_token(tiny_model, " Paris") == tiny_model.tokenizer.encode_ordinary(" Paris")[0]
    for bad, message in ((d_vocab, "outside the model's vocabulary"), (-1, "outside"), ("", "empty"),
                         (" Paris is", "not one")):
        with pytest.raises(AnalysisError, match=message):
            single_token(tiny_model, bad)


def test_head_scores_use_the_random_tokens_asked_for(planted):
    from analyses.heads import head_scores

    for kwargs in (dict(seq_len=5, batch=3, seed=1), dict(seq_len=9, batch=1, seed=2, prepend_bos=False)):
        tokens = repeated_random_tokens(planted, **kwargs)
        _, cache = planted.run_with_cache(tokens)
        patterns = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(planted.cfg.n_layers)])
        expected = slow_scores(patterns, tokens)
        for name, value in head_scores(planted, **kwargs).items():
            torch.testing.assert_close(value.double(), expected[name], atol=1e-6, rtol=0, msg=f"{name} {kwargs}")


def test_the_lens_reads_the_site_asked_for_and_refuses_resid_mid_without_mlps(small, planted):
    from analyses.common import AnalysisError
    from analyses.logit_lens import per_layer_loss, residual_stack

    tokens = random_tokens(2, 9, seed=4)
    for site in ("pre", "mid", "post", "all"):
        torch.testing.assert_close(per_layer_loss(small, tokens, site=site), logit_lens(small, tokens, site=site).loss)
    _, cache = small.run_with_cache(tokens)
    assert residual_stack(small, cache, "pre")[1] == ["0_pre", "1_pre", "final"]
    assert residual_stack(small, cache, "all")[1] == ["0_pre", "0_mid", "1_pre", "1_mid", "final"]
    planted_tokens = repeated_random_tokens(planted, seq_len=5, batch=1)
    for site in ("mid", "all"):
        with pytest.raises(AnalysisError, match="no resid_mid"):
            logit_lens(planted, planted_tokens, site=site)
    assert logit_lens(planted, planted_tokens, site="pre").labels == ["0_pre", "1_pre", "final"]


def test_dla_of_an_attention_only_model_has_no_mlps(planted):
    tokens = repeated_random_tokens(planted, seq_len=5, batch=1)
    result = direct_logit_attribution(planted, tokens, int(tokens[0, 2]), pos=6)  # a1 again: a2 follows
    assert result.mlps is None and result.heads.shape == (2, planted.cfg.n_heads)
    assert result.heads[INDUCTION_HEAD] > 1.0, "the induction head predicts the token after the repeat"


def test_agreement_reports_correlation_and_largest_difference_per_shared_kind():
    from analyses.patching import agreement

    real = {"x": torch.tensor([1.0, 2.0, 3.0, 4.0]), "flat": torch.tensor([1.0, 1.0]), "only_real": torch.zeros(2)}
    approx = {"x": torch.tensor([2.0, 1.0, 4.0, 9.0]), "flat": torch.tensor([0.0, 3.0]), "only_approx": torch.zeros(2)}
    out = agreement(real, approx)
    assert list(out) == ["x", "flat"]
    a, b = real["x"].double(), approx["x"].double()
    expected = ((a - a.mean()) * (b - b.mean())).sum() / ((a - a.mean()).norm() * (b - b.mean()).norm())
    assert out["x"]["correlation"] == pytest.approx(float(expected), abs=1e-12)
    assert out["x"]["max_abs_diff"] == 5.0 and out["flat"]["max_abs_diff"] == 2.0
    assert math.isnan(out["flat"]["correlation"]), "no correlation with a constant"


def test_the_lens_of_a_single_token_has_no_loss(small):
    result = logit_lens(small, random_tokens(1, 1, seed=0))
    assert result.loss.isnan().all() and result.target_rank.shape == (2, 1, 0)


def test_patch_effect_computes_its_own_baseline_when_given_none(small):
    from analyses.patching import Patch, baseline, patch_effect

    clean = random_tokens(1, 6, seed=2)
    corrupted = clean.clone()
    corrupted[0, [1, 3]] = (corrupted[0, [1, 3]] + 1) % 100
    metric = logit_diff(3, 5)
    patches = [Patch("blocks.1.attn.hook_v", (slice(None), 2))]
    base = baseline(small, clean, corrupted, metric)
    expected = hand_patching(small, base.clean_cache, clean, corrupted, metric, "v")[1, 2].item()
    assert patch_effect(small, clean, corrupted, metric, patches) == pytest.approx(expected, abs=1e-9)
    assert patch_effect(small, clean, corrupted, metric, patches, base) == pytest.approx(expected, abs=1e-9)


def test_mlp_ablation_uses_the_metric_given_and_resampling_follows_its_seed(tiny_model, ablation_setup):
    tokens, reference, ref_cache, one_cache = ablation_setup
    metric = logit_diff(11, 13, pos=-2)
    result = head_ablation(tiny_model, tokens, "mean", metric=metric, reference_tokens=reference)
    clean = float(metric(tiny_model(tokens).detach()))
    for layer in range(tiny_model.cfg.n_layers):
        name = f"blocks.{layer}.hook_mlp_out"
        logits = run_edited(tiny_model, tokens, name, hand_replacement("mean", ref_cache, one_cache, name))
        assert result.mlps[layer].item() == pytest.approx(float(metric(logits)) - clean, abs=1e-5)
    batch = tokens.repeat(4, 1)
    runs = [head_ablation(tiny_model, batch, "resample", reference_tokens=reference, seed=s).heads for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_repeated_random_tokens_bounds_and_bos(planted, tiny_model):
    from analyses.common import AnalysisError

    assert repeated_random_tokens(tiny_model, seq_len=3, batch=1)[0, 0] == 50256
    tokens = repeated_random_tokens(planted, seq_len=2, batch=3)
    assert (tokens[:, 0] == 63).all() and not (tokens[:, 1:] == 63).any()
    assert repeated_random_tokens(planted, seq_len=31, batch=1).shape == (1, 63)
    assert repeated_random_tokens(planted, seq_len=32, batch=1, prepend_bos=False).shape == (1, 64)
    for kwargs in (dict(seq_len=1), dict(seq_len=32), dict(seq_len=33, prepend_bos=False)):
        with pytest.raises(AnalysisError):
            repeated_random_tokens(planted, **kwargs)


def test_detectors_without_repeats_are_nan_and_the_rest_still_scored():
    patterns = torch.cat([hand_patterns(), hand_patterns()])  # 2 layers, 1 sequence, 5 heads
    scores = scores_from_patterns(patterns, torch.arange(7)[None])  # no token repeats
    assert scores["duplicate_token"].shape == scores["induction"].shape == (2, 5)
    assert scores["duplicate_token"].isnan().all() and scores["induction"].isnan().all()
    assert scores["previous_token"][0, 0] == 1.0


def test_attribution_patching_takes_kinds_and_answers(small):
    clean = random_tokens(1, 6, seed=2)
    corrupted = clean.clone()
    corrupted[0, [1, 3]] = (corrupted[0, [1, 3]] + 1) % 100
    by_metric = attribution_patching(small, clean, corrupted, logit_diff(3, 5), kinds=["v", "resid_pre"])
    by_answer = attribution_patching(small, clean, corrupted, answer=3, wrong=5, kinds=["v", "resid_pre"])
    assert list(by_metric) == list(by_answer) == ["v", "resid_pre"]
    for kind in by_metric:
        torch.testing.assert_close(by_answer[kind], by_metric[kind])
    only_answer = attribution_patching(small, clean, corrupted, answer=3, kinds=["v"])
    assert not torch.allclose(only_answer["v"], by_metric["v"])
