"""Known-answer tests: each analysis against a value that holds by construction."""

import copy

import pytest
import torch

from analyses.ablation import ablate, ablation_hooks, head_ablation
from analyses.common import logit_diff
from analyses.dla import direct_logit_attribution
from analyses.heads import head_scores, repeated_random_tokens
from analyses.logit_lens import layer_logits, logit_lens, per_layer_loss, residual_stack
from analyses.patching import (
    Patch, activation_patching, agreement, attribute_patches, attribution_patching, baseline, patch_effect, run_patched,
)
from tests.planted import INDUCTION_HEAD, PREV_HEAD

PROMPT = "The quick brown fox jumps over the lazy dog"
CLEAN = "When John and Mary went to the store, John gave a drink to"
CORRUPTED = "When John and Mary went to the store, Mary gave a drink to"


def induction_pair(model, seq_len=10):
    """Repeated random tokens, and a corruption of the token after the last query's earlier
    occurrence: induction at the second-to-last position predicts different tokens."""
    clean = repeated_random_tokens(model, seq_len=seq_len, batch=1, seed=0)
    corrupted = clean.clone()
    replacement = next(t for t in range(model.cfg.d_vocab - 1) if t not in clean[0].tolist())
    corrupted[0, seq_len] = replacement
    return clean, corrupted, logit_diff(int(clean[0, seq_len]), replacement, pos=-2)


def test_last_layer_logit_lens_is_the_models_logits(tiny_model):
    tokens = tiny_model.to_tokens(PROMPT)
    logits, cache = tiny_model.run_with_cache(tokens)
    for site in ("post", "pre", "all"):
        stack, labels = residual_stack(tiny_model, cache, site)
        torch.testing.assert_close(layer_logits(tiny_model, stack[-1]), logits, atol=1e-5, rtol=1e-5)
    losses = per_layer_loss(tiny_model, tokens)
    assert losses.shape == (tiny_model.cfg.n_layers,)
    assert losses[-1].item() == pytest.approx(tiny_model.loss(tokens).item(), abs=1e-5)
    result = logit_lens(tiny_model, tokens, top_k=3)
    assert torch.equal(result.top_tokens[-1, 0, :, 0], logits[0].argmax(-1))
    assert torch.equal(result.target_rank[-1] == 0, result.top_tokens[-1, :, :-1, 0] == tokens[:, 1:])


def test_patching_resid_pre_everywhere_is_one_and_nothing_is_zero(tiny_model):
    # In float64: the random model's logit difference barely moves, and normalising by it
    # would magnify float32 rounding between batched and unbatched runs.
    tiny_model = copy.deepcopy(tiny_model).double()
    clean, corrupted = tiny_model.to_tokens(CLEAN), tiny_model.to_tokens(CORRUPTED)
    metric = logit_diff(tiny_model.to_tokens(" Mary", False)[0, 0].item(), tiny_model.to_tokens(" John", False)[0, 0].item())
    base = baseline(tiny_model, clean, corrupted, metric)
    assert patch_effect(tiny_model, clean, corrupted, metric, [Patch("blocks.0.hook_resid_pre")], base) == pytest.approx(1.0, abs=1e-9)
    assert patch_effect(tiny_model, clean, corrupted, metric, [], base) == pytest.approx(0.0, abs=1e-9)
    # The sweep's patched runs are batched: each must match its own unbatched run.
    results = activation_patching(tiny_model, clean, corrupted, metric, kinds=["resid_pre", "head_out"])
    layer, pos = 1, 9
    single = patch_effect(tiny_model, clean, corrupted, metric, [Patch(f"blocks.{layer}.hook_resid_pre", (pos,))], base)
    assert results["resid_pre"][layer, pos].item() == pytest.approx(single, abs=1e-4)
    # Patching every position of the last layer's resid_pre also restores the clean run.
    assert results["resid_pre"].shape == (2, clean.shape[1])
    all_pos = run_patched(tiny_model, corrupted, base.clean_cache, metric, [[Patch("blocks.1.hook_resid_pre")]])
    assert base.normalise(all_pos).item() == pytest.approx(1.0, abs=1e-5)


def test_zero_ablating_every_head_removes_attn_out_except_its_bias(tiny_model):
    tokens = tiny_model.to_tokens(PROMPT)
    layer = 1
    heads = [(layer, h) for h in range(tiny_model.cfg.n_heads)]
    b_O = tiny_model.blocks[layer].attn.b_O.detach()
    with torch.no_grad():
        ablated = tiny_model.run_with_hooks(tokens, fwd_hooks=ablation_hooks(tiny_model, heads=heads))
        removed = tiny_model.run_with_hooks(
            tokens, fwd_hooks=[(f"blocks.{layer}.hook_attn_out", lambda out, hook: b_O.expand_as(out))]
        )
        clean = tiny_model(tokens)
    torch.testing.assert_close(ablated, removed, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ablated, clean, atol=1e-3)
    assert ablate(tiny_model, tokens, heads=heads) == pytest.approx(
        torch.nn.functional.cross_entropy(removed[0, :-1], tokens[0, 1:]).item(), abs=1e-5
    )


def test_planted_heads_are_recognised_by_the_detectors(planted):
    scores = head_scores(planted, seq_len=20, batch=8, seed=0)
    induction, previous = scores["induction"], scores["previous_token"]
    assert induction[INDUCTION_HEAD] > 0.9
    assert previous[PREV_HEAD] > 0.9
    others = torch.ones_like(induction, dtype=torch.bool)
    others[INDUCTION_HEAD] = False
    assert (induction[others] < 0.2).all(), induction
    # The same definitions on given tokens (real text), with a repeat in them.
    tokens = repeated_random_tokens(planted, seq_len=15, batch=2, seed=3)
    assert head_scores(planted, tokens)["induction"][INDUCTION_HEAD] > 0.9


def test_planted_circuit_is_singled_out_by_ablation(planted):
    tokens = repeated_random_tokens(planted, seq_len=20, batch=4, seed=1)
    for method in ("zero", "mean", "resample"):
        effects = head_ablation(planted, tokens, method).heads
        assert effects[INDUCTION_HEAD] > 1.0 and effects[PREV_HEAD] > 1.0, (method, effects)
        others = torch.ones_like(effects, dtype=torch.bool)
        others[INDUCTION_HEAD] = others[PREV_HEAD] = False
        assert effects[others].abs().max() < 1e-4, (method, effects)


def test_planted_induction_head_is_singled_out_by_patching(planted):
    clean, corrupted, metric = induction_pair(planted)
    results = activation_patching(planted, clean, corrupted, metric)
    head_out = results["head_out"].clone()
    assert head_out[INDUCTION_HEAD] == pytest.approx(1.0, abs=0.02)
    head_out[INDUCTION_HEAD] = 0
    assert head_out.abs().max() < 0.02
    assert results["v"][INDUCTION_HEAD] == pytest.approx(1.0, abs=0.02)
    assert results["head_out_by_pos"].shape == (2, clean.shape[1], planted.cfg.n_heads)
    approx = attribution_patching(planted, clean, corrupted, metric)
    assert agreement(results, approx)["head_out"]["correlation"] > 0.99


def test_dla_contributions_and_remainder_sum_to_the_logit(tiny_model):
    tokens = tiny_model.to_tokens(PROMPT)
    logits = tiny_model(tokens).detach()
    answer, wrong = tiny_model.to_tokens(" cat", False)[0, 0].item(), tiny_model.to_tokens(" dog", False)[0, 0].item()
    for wrong_id, expected in ((None, logits[0, -1, answer]), (wrong, logits[0, -1, answer] - logits[0, -1, wrong])):
        result = direct_logit_attribution(tiny_model, tokens, answer, wrong_id)
        total = result.heads.sum() + result.mlps.sum() + sum(result.other.values())
        assert total.item() == pytest.approx(expected.item(), abs=1e-4)
        assert result.total == pytest.approx(expected.item(), abs=1e-4)
        assert abs(result.other["remainder"]) < 1e-4


def test_attribution_patching_equals_patching_for_a_linear_metric(tiny_model):
    # The logits are linear in ln_final's output: attribution patching is then exact.
    tiny_model = copy.deepcopy(tiny_model).double()
    clean, corrupted = tiny_model.to_tokens(CLEAN), tiny_model.to_tokens(CORRUPTED)
    metric = logit_diff(tiny_model.to_tokens(" Mary", False)[0, 0].item(), tiny_model.to_tokens(" John", False)[0, 0].item())
    patches = [Patch("ln_final.hook_normalized", (p,)) for p in range(clean.shape[1])]
    base = baseline(tiny_model, clean, corrupted, metric)
    real = base.normalise(run_patched(tiny_model, corrupted, base.clean_cache, metric, [[p] for p in patches]))
    approx = attribute_patches(tiny_model, clean, corrupted, metric, patches)
    torch.testing.assert_close(approx.double(), real, atol=1e-6, rtol=1e-6)
    assert real[-1] == pytest.approx(1.0, abs=1e-4)  # only the last position feeds the metric
