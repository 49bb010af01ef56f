"""SAELens on our model: an SAE trained through ``LanguageModelSAETrainingRunner(...,
override_model=model)`` learns to reconstruct our activations, and the model-side API of
``HookedSAETransformer`` (``run_with_saes``, ``run_with_cache_with_saes``, ``add_sae`` /
``reset_saes``, ``saes()``) splices it in: checked against a splice written by hand with
``run_with_hooks``."""

import copy

import pytest
import torch

from hooked_gpt2 import GPT2Config, HookedGPT2, HookError

sae_lens = pytest.importorskip("sae_lens")
datasets = pytest.importorskip("datasets")

HOOK = "blocks.0.hook_resid_post"
D_VOCAB, N_CTX = 100, 16


@pytest.fixture(scope="module")
def model() -> HookedGPT2:
    torch.manual_seed(0)
    return HookedGPT2(GPT2Config.preset("tiny", d_model=32, n_heads=4, n_ctx=N_CTX, d_vocab=D_VOCAB)).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, D_VOCAB, (4, N_CTX), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def trained(model):
    """(the SAE before training, after, SAELens's activation store): 2,048 tokens of SAELens's own training loop on our model."""
    ids = torch.randint(0, D_VOCAB, (2048, N_CTX), generator=torch.Generator().manual_seed(0))
    cfg = sae_lens.LanguageModelSAERunnerConfig(
        sae=sae_lens.StandardTrainingSAEConfig(d_in=model.cfg.d_model, d_sae=64, l1_coefficient=1e-3),
        hook_name=HOOK, context_size=N_CTX, is_dataset_tokenized=True, streaming=False,
        training_tokens=2048, train_batch_size_tokens=64, store_batch_size_prompts=8, n_batches_in_buffer=4,
        lr=1e-2, device="cpu", prepend_bos=False, sequence_separator_token=None, seed=0,
        logger=sae_lens.LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None,
        output_path=None, n_eval_batches=1, eval_batch_size_prompts=4, verbose=False,
        n_batches_for_norm_estimate=2,
    )
    runner = sae_lens.LanguageModelSAETrainingRunner(
        cfg, override_model=model, override_dataset=datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    )
    before = copy.deepcopy(runner.sae)
    after = runner.run().eval()
    before.cfg.metadata.hook_name = HOOK  # SAELens names the hook point when training ends
    return before.eval(), after, runner.activations_store


@pytest.fixture(scope="module")
def sae(trained):
    return trained[1]


def clean_activation(model, tokens) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    return cache[HOOK]


def test_training_through_override_model_improves_the_reconstruction(model, tokens, trained):
    before, after, store = trained
    x = clean_activation(model, tokens)
    torch.testing.assert_close(store.get_activations(tokens), x, rtol=0, atol=0)  # SAELens trains on our cache
    with torch.no_grad():
        errors = [((sae(x) - x) ** 2).mean().item() for sae in (before, after)]
    assert errors[1] < 0.5 * errors[0], errors
    assert after.cfg.metadata.hook_name == HOOK


def manual_splice(sae, edit=None, error_term=False):
    """The splice by hand: a hook replacing the activation with the SAE's reconstruction."""
    def splice(x, hook):
        acts = sae.encode(x)
        out = sae.decode(acts if edit is None else edit(acts.clone()))
        return out + (x - sae.decode(acts)) if error_term else out
    return [(HOOK, splice)]


def test_run_with_cache_with_saes_equals_a_manual_splice(model, tokens, sae):
    with torch.no_grad():
        expected = model.run_with_hooks(tokens, fwd_hooks=manual_splice(sae))
        logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
        x = clean_activation(model, tokens)
        acts = sae.encode(x)
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, model(tokens), atol=1e-6)  # the SAE changed the run
    torch.testing.assert_close(cache[HOOK + ".hook_sae_input"], x)
    torch.testing.assert_close(cache[HOOK + ".hook_sae_acts_post"], acts)
    torch.testing.assert_close(cache[HOOK + ".hook_sae_output"], sae.decode(acts))
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], sae.decode(acts))  # downstream sees it
    assert HOOK not in cache  # the spliced hook point is the SAE while it is there
    names = list(cache)
    assert names.index("blocks.0.hook_mlp_out") < names.index(HOOK + ".hook_sae_acts_post") < names.index(
        "blocks.1.hook_resid_pre")


def test_the_error_term_keeps_the_output_and_lets_feature_edits_act(model, tokens, sae):
    def kill_feature(acts):
        acts[..., :8] = 0.0
        return acts

    def kill_hook(acts, hook):
        return kill_feature(acts)

    with torch.no_grad():
        unchanged = model.run_with_saes(tokens, saes=[sae], use_error_term=True)
        torch.testing.assert_close(unchanged, model(tokens), atol=1e-5, rtol=1e-5)
        model.add_sae(sae, use_error_term=True)
        try:
            edited = model.run_with_hooks(tokens, fwd_hooks=[(HOOK + ".hook_sae_acts_post", kill_hook)])
        finally:
            model.reset_saes()
        without_error = model.run_with_hooks_with_saes(
            tokens, saes=[sae], fwd_hooks=[(HOOK + ".hook_sae_acts_post", kill_hook)])
        expected = model.run_with_hooks(tokens, fwd_hooks=manual_splice(sae, kill_feature, error_term=True))
    torch.testing.assert_close(edited, expected)
    assert not torch.allclose(edited, unchanged, atol=1e-6)
    torch.testing.assert_close(without_error, model.run_with_hooks(tokens, fwd_hooks=manual_splice(sae, kill_feature)))
    assert sae.use_error_term is False  # the SAE's own setting is left as it was


def test_reset_restores_the_original_hook_point_exactly(model, tokens, sae):
    original = model.hook_dict[HOOK]
    names, n_params = model.hook_names(), len(list(model.parameters()))
    before = model(tokens)
    model.add_sae(sae)
    assert model.acts_to_saes == {HOOK: sae}
    assert len(list(model.parameters())) == n_params  # the SAE's parameters are not the model's
    with pytest.raises(HookError, match="hook_sae"):
        model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda x, hook: None)])
    model.reset_saes()
    assert model.blocks[0].hook_resid_post is original and model.hook_dict[HOOK] is original
    assert model.hook_names() == names and model.acts_to_saes == {}
    assert set(sae.hook_dict) == {name.rpartition(".")[2] for name in sae.hook_dict}
    assert all(hook.name == name for name, hook in sae.hook_dict.items())  # the SAE's names are its own again
    torch.testing.assert_close(model(tokens), before, rtol=0, atol=0)
    with pytest.raises(HookError, match="no SAE"):
        model.reset_saes(HOOK)


def test_the_saes_context_restores_an_sae_it_displaced(model, tokens, sae, trained):
    before = trained[0]
    model.add_sae(before, use_error_term=True)
    try:
        with model.saes(saes=[sae]):
            assert model.acts_to_saes == {HOOK: sae}
        assert model.acts_to_saes == {HOOK: before}
        assert model.blocks[0].hook_resid_post.use_error_term is True
    finally:
        model.reset_saes()
    with pytest.raises(RuntimeError, match="boom"), model.saes(saes=sae):
        raise RuntimeError("boom")
    assert model.acts_to_saes == {}


def test_splicing_refuses_what_it_cannot_honour(model, sae, trained):
    unnamed = copy.deepcopy(trained[0])
    unnamed.cfg.metadata.hook_name = None
    with pytest.raises(ValueError, match="hook_name is None"):
        model.add_sae(unnamed)
    model.add_hook(HOOK, lambda x, hook: None)
    try:
        with pytest.raises(HookError, match="has hooks attached"):
            model.add_sae(sae)
    finally:
        model.reset_hooks()
    with pytest.raises(ValueError, match="exclude_special_tokens"):
        model.add_sae(sae, exclude_special_tokens=True)
    assert model.acts_to_saes == {}


def test_hooks_left_on_an_sae_hook_point_fire_and_reset(model, tokens, sae):
    seen = []
    with model.saes(saes=[sae]):
        model.add_hook(HOOK + ".hook_sae_acts_post", lambda acts, hook: seen.append(hook.name))
        model(tokens)
        model.reset_hooks()
        model(tokens)
    assert seen == [HOOK + ".hook_sae_acts_post"]
