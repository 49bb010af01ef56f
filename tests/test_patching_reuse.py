"""Patching that reuses the clean run: patched runs start at the patched block from the
corrupted run's cached residual stream, batched, and unembed only the positions the
metric reads. The results must equal TransformerLens's ``patching`` module on the same
weights, and our own unbatched recomputation from the tokens."""

import warnings

import pytest
import torch

from analyses.common import logit_diff, mean_loss
from analyses.patching import (
    KINDS, Patch, activation_patching, baseline, forward_from, patches_for, residual_names, run_patched,
)
from hooked_gpt2 import GPT2Config, HookedGPT2
from tests.perturbed import perturb_biases_and_norms

# Our kind -> TransformerLens's function (same axes: [layer pos], [layer head], [layer pos head]).
TL_FUNCTIONS = {
    "resid_pre": "get_act_patch_resid_pre",
    "attn_out": "get_act_patch_attn_out",
    "mlp_out": "get_act_patch_mlp_out",
    "head_out": "get_act_patch_attn_head_out_all_pos",
    "head_out_by_pos": "get_act_patch_attn_head_out_by_pos",
    "q": "get_act_patch_attn_head_q_all_pos",
    "k": "get_act_patch_attn_head_k_all_pos",
    "v": "get_act_patch_attn_head_v_all_pos",
    "pattern": "get_act_patch_attn_head_pattern_all_pos",
}


def perturbed_model(n_layers=3, seed=0) -> HookedGPT2:
    """A random GPT-2 whose biases and layer norms are not at their initial values."""
    torch.manual_seed(seed)
    model = HookedGPT2(GPT2Config(n_layers=n_layers, d_model=32, n_heads=4, n_ctx=32, d_vocab=1000)).eval()
    perturb_biases_and_norms(model)
    return model


def prompt_pair(model, n_pos=7, seed=1):
    clean = torch.randint(0, model.cfg.d_vocab, (1, n_pos), generator=torch.Generator().manual_seed(seed))
    corrupted = clean.clone()
    corrupted[0, [1, 4]] = (corrupted[0, [1, 4]] + 17) % model.cfg.d_vocab
    return clean, corrupted


def test_every_kind_equals_transformer_lens_patching_on_the_same_weights(tmp_path):
    pytest.importorskip("transformer_lens")
    from transformer_lens import patching as tl_patching

    from tests.test_tl_parity import NO_PROCESSING, tl_model

    ours = perturbed_model(n_layers=2)
    theirs = tl_model(ours.save_hf(tmp_path / "gpt2"), NO_PROCESSING)
    clean, corrupted = prompt_pair(ours, n_pos=6)
    with torch.no_grad():  # answers the corruption moves, so that normalising does not amplify rounding
        moved = ours(clean)[0, -1] - ours(corrupted)[0, -1]
        metric = logit_diff(int(moved.argmax()), int(moved.argmin()))
    results = activation_patching(ours, clean, corrupted, metric, max_copies=5)
    assert set(results) == set(TL_FUNCTIONS)

    clean_logits, their_cache = theirs.run_with_cache(clean)
    value_clean, value_corrupted = metric(clean_logits), metric(theirs(corrupted))
    normalised = lambda logits: (metric(logits) - value_corrupted) / (value_clean - value_corrupted)  # noqa: E731
    for kind, function in TL_FUNCTIONS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = getattr(tl_patching, function)(theirs, corrupted, their_cache, normalised)
        torch.testing.assert_close(results[kind].float(), expected.float(), atol=2e-4, rtol=1e-4, msg=kind)


@pytest.fixture(scope="module")
def model64():
    return perturbed_model(n_layers=3).double()


def every_patch_and_some_groups(model, n_pos):
    """Every kind's single patches, and groups whose patches span blocks, the embeddings
    and the final layer norm."""
    groups = [[p] for kind in KINDS for p in patches_for(model, kind, n_pos)[0]]
    groups += [
        [Patch("blocks.2.hook_resid_pre", (3,)), Patch("blocks.0.attn.hook_z", (slice(None), 1))],
        [Patch("hook_embed", (2,)), Patch("blocks.1.hook_mlp_out", (4,))],
        [Patch("hook_pos_embed", (5,))],
        [Patch("ln_final.hook_normalized", (2,))],
        [Patch("blocks.2.hook_resid_post", (6,)), Patch("ln_final.hook_scale", (6,))],
        [Patch("blocks.1.hook_resid_pre", (1,)), Patch("ln_final.hook_normalized", (0,))],
        [],
    ]
    return groups


@pytest.mark.parametrize("metric_name", ["last position logit diff", "loss over every position"])
def test_reused_batched_runs_equal_the_unbatched_recomputation(model64, metric_name):
    clean, corrupted = prompt_pair(model64)
    metric = logit_diff(11, 12) if metric_name.startswith("last") else mean_loss(corrupted)
    _, clean_cache = model64.run_with_cache(clean)
    groups = every_patch_and_some_groups(model64, clean.shape[1])
    reused = run_patched(model64, corrupted, clean_cache, metric, groups, max_copies=6)
    recomputed = run_patched(model64, corrupted, clean_cache, metric, groups, max_copies=1, reuse=False)
    torch.testing.assert_close(reused, recomputed, atol=1e-10, rtol=1e-10)
    assert recomputed.std() > 0, "the patches change the metric"


def test_patched_runs_skip_the_blocks_below_the_patch(model64):
    clean, corrupted = prompt_pair(model64)
    _, clean_cache = model64.run_with_cache(clean)
    fired = []
    count = lambda activation, hook: fired.append(hook.name)  # noqa: E731
    groups = [[Patch("blocks.2.hook_resid_pre", (p,))] for p in range(clean.shape[1])]
    base = baseline(model64, clean, corrupted, logit_diff(11, 12))
    with model64.hooks(fwd_hooks=[(name, count) for name in residual_names(model64)]):
        run_patched(model64, corrupted, clean_cache, logit_diff(11, 12), groups, corrupted_cache=base.corrupted_cache)
    assert fired == ["blocks.2.hook_resid_pre", "blocks.2.hook_resid_post"], "one batched run, from block 2"


def test_forward_from_a_block_equals_the_full_forward(model64):
    tokens = prompt_pair(model64)[0].repeat(2, 1)
    _, cache = model64.run_with_cache(tokens, names_filter=residual_names(model64))
    full = model64(tokens)
    for layer, name in enumerate(residual_names(model64)):
        torch.testing.assert_close(forward_from(model64, cache[name], layer), full, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(forward_from(model64, cache[name], layer, last=2), full[:, -2:],
                                   atol=1e-12, rtol=1e-12)
