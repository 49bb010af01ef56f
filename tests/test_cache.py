"""run_with_cache and ActivationCache: what is stored, gradients against autograd, short
names, and the residual-stream utilities against direct computation."""

import pytest
import torch
import torch.nn.functional as F

from hooked_gpt2 import HookedGPT2, HookError
from tests.reference_gpt2 import make_model, reference_forward

BATCH, POS = 2, 6


@pytest.fixture(scope="module")
def model() -> HookedGPT2:
    return make_model()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 100, (BATCH, POS), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def run(model, tokens):
    return model.run_with_cache(tokens)


def default_names(model) -> list[str]:
    """What an unfiltered cache holds: every hook but the switched-off ones (hook_result
    without set_use_attn_result, hook_attn_in, ...), as in TransformerLens."""
    switched = ("hook_result", "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in")
    return [name for name in model.hook_names() if not name.endswith(switched)]


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


def next_token_loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


# What is stored.


def test_the_full_cache_holds_every_hook_and_matches_the_reference(model, tokens, run):
    logits, cache = run
    expected_logits, expected = reference_forward(model, tokens)
    close(logits, expected_logits)
    assert list(cache) == default_names(model)  # forward order
    for name in default_names(model):
        assert not cache[name].requires_grad
        close(cache[name], expected[name])


@pytest.mark.parametrize(
    "names_filter, expected",
    [
        ("blocks.1.hook_resid_mid", ["blocks.1.hook_resid_mid"]),
        (["blocks.2.attn.hook_z", "hook_embed"], ["hook_embed", "blocks.2.attn.hook_z"]),
        (lambda n: n.endswith("hook_pattern"), [f"blocks.{i}.attn.hook_pattern" for i in range(3)]),
    ],
)
def test_a_names_filter_stores_only_those(model, tokens, names_filter, expected):
    logits, cache = model.run_with_cache(tokens, names_filter=names_filter)
    assert list(cache) == expected
    close(logits, model(tokens))
    for name in expected:
        with torch.no_grad():
            close(cache[name], reference_forward(model, tokens)[1][name])


def test_a_valid_but_uncached_name_says_how_to_cache_it(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter="hook_embed")
    with pytest.raises(KeyError, match="names_filter"):
        cache["blocks.0.hook_resid_pre"]
    with pytest.raises(KeyError, match="incl_bwd"):
        cache["hook_embed_grad"]
    assert "hook_embed" in cache and "embed" in cache and "pos_embed" not in cache


def test_unknown_names_in_a_cache_lookup_raise_hook_error_with_the_closest_names(run):
    # Regression: a misspelt full name used to fall through to the short-name parser and
    # raise a KeyError saying it "needs a layer", naming no valid hook.
    _, cache = run
    for typo, meant in [
        ("blocks.1.attn.hook_patern", "blocks.1.attn.hook_pattern"),
        ("hook_embd", "hook_embed"),
        ("blocks.0.hook_resid_psot", "blocks.0.hook_resid_post"),
        ("blocks.0.attn.hook_patern_grad", "blocks.0.attn.hook_pattern"),
    ]:
        with pytest.raises(HookError, match=meant):
            cache[typo]
        assert typo not in cache
    with pytest.raises(KeyError, match="needs a layer"):
        cache["pattern"]
    for misspelt in [("patern", 0), "patern0", "patern"]:
        with pytest.raises(HookError, match="unknown activation 'patern'; did you mean 'pattern'"):
            cache[misspelt]
        assert misspelt not in cache
    from hooked_gpt2 import utils

    with pytest.raises(HookError, match="unknown activation 'nonsense'; the short names are .*resid_pre"):
        utils.get_act_name("nonsense")  # not "needs a layer", whose advice would then fail too
    with pytest.raises(HookError, match=r"needs a layer: get_act_name\('pattern', 0\)"):
        utils.get_act_name("pattern")
    assert utils.get_act_name("pattern", 0) == "blocks.0.attn.hook_pattern"


# Gradients.


def test_run_with_cache_keeps_the_grad_mode_and_detaches_what_it_caches(model, tokens):
    """As in TransformerLens: with grad enabled the logits keep their graph (an
    attribution-patching metric can call backward on them); the cached activations never do."""
    logits, cache = model.run_with_cache(tokens)
    assert logits.grad_fn is not None
    assert not any(value.requires_grad for value in cache.values())
    logits[0, -1, 3].backward()
    assert model.W_E.grad is not None
    model.zero_grad()
    with torch.no_grad():
        logits, _ = model.run_with_cache(tokens)
    assert logits.grad_fn is None


def test_incl_bwd_stores_gradients_equal_to_autograds(model, tokens):
    activations = {}

    def keep(act, hook):
        act.retain_grad()
        activations[hook.name] = act

    logits_ref = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, keep)])
    next_token_loss(logits_ref, tokens).backward()
    model.zero_grad()

    logits, cache = model.run_with_cache(tokens, incl_bwd=True)
    model.zero_grad()
    close(logits, logits_ref.detach())
    assert logits.grad_fn is not None  # as TransformerLens's; the graph was freed by the backward pass
    names = default_names(model)
    assert list(cache) == names + [n + "_grad" for n in names]
    for name in names:
        grad = cache[name + "_grad"]
        assert grad.shape == cache[name].shape
        close(grad, activations[name].grad, atol=1e-6)  # the reference ran the per-head path
    assert cache["blocks.0.hook_resid_pre_grad"].abs().max() > 0


def test_incl_bwd_with_a_metric_and_a_filter(model, tokens):
    metric = lambda logits: logits[:, -1, 7].sum()  # noqa: E731
    activations = {}

    def keep(act, hook):
        act.retain_grad()
        activations[hook.name] = act

    name = "blocks.1.attn.hook_v"
    metric(model.run_with_hooks(tokens, fwd_hooks=[(name, keep)])).backward()
    model.zero_grad()
    _, cache = model.run_with_cache(tokens, names_filter=name, incl_bwd=True, metric=metric)
    model.zero_grad()
    assert list(cache) == [name, name + "_grad"]
    close(cache[name + "_grad"], activations[name].grad, atol=1e-7)
    with pytest.raises(ValueError, match="scalar"):
        model.run_with_cache(tokens, incl_bwd=True, metric=lambda logits: logits.sum(-1))
    model.zero_grad()


# Short names.


def test_short_names_and_negative_layers(model, run):
    _, cache = run
    n = model.cfg.n_layers
    assert cache["pattern", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["attn", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["scores", 1] is cache["blocks.1.attn.hook_attn_scores"]
    assert cache["scale"] is cache["ln_final.hook_scale"]
    assert cache["normalized"] is cache["ln_final.hook_normalized"]
    assert cache["scale", 1, "ln2"] is cache["blocks.1.ln2.hook_scale"]
    assert cache["normalized", 0, "ln1"] is cache["blocks.0.ln1.hook_normalized"]
    assert cache["embed"] is cache["hook_embed"] and cache["pos_embed"] is cache["hook_pos_embed"]
    assert cache["resid_post", -1] is cache[f"blocks.{n - 1}.hook_resid_post"]
    assert cache["q", -n] is cache["blocks.0.attn.hook_q"]
    assert cache["post", -2] is cache[f"blocks.{n - 2}.mlp.hook_post"]
    assert ("pattern", -1) in cache and ("resid_mid", 0) in cache
    for bad in [("pattern", n), ("pattern", -n - 1)]:
        with pytest.raises(KeyError, match="out of range"):
            cache[bad]
    with pytest.raises(KeyError, match="ln1"):
        cache["scale", 1]


# Residual-stream utilities.


def test_decompose_resid_sums_to_the_final_resid_post(model, run):
    _, cache = run
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "pos_embed"] + [f"{l}_{k}_out" for l in range(3) for k in ("attn", "mlp")]
    assert stack.shape == (len(labels), BATCH, POS, model.cfg.d_model)
    close(stack.sum(0), cache["resid_post", -1])
    close(stack[labels.index("1_mlp_out")], cache["mlp_out", 1], atol=0)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_decompose_resid_at_a_layer_and_at_the_mlp_input(run, layer):
    _, cache = run
    close(cache.decompose_resid(layer=layer).sum(0), cache["resid_pre", layer])
    stack, labels = cache.decompose_resid(layer=layer, mlp_input=True, return_labels=True)
    assert labels[-1] == f"{layer}_attn_out"
    close(stack.sum(0), cache["resid_mid", layer])
    for mlp_input in (False, True):  # the attention and MLP parts add up to the whole
        if layer == 0:
            break  # no MLP has written yet: the "mlp" part would be empty
        attn = cache.decompose_resid(layer=layer, mlp_input=mlp_input, mode="attn")
        mlp = cache.decompose_resid(layer=layer, mlp_input=mlp_input, mode="mlp", incl_embeds=False)
        close(attn.sum(0) + mlp.sum(0), cache["resid_mid" if mlp_input else "resid_pre", layer])
    _, attn_labels = cache.decompose_resid(layer=2, mode="attn", return_labels=True)
    _, mlp_labels = cache.decompose_resid(layer=2, mode="mlp", incl_embeds=False, return_labels=True)
    assert attn_labels == ["embed", "pos_embed", "0_attn_out", "1_attn_out"]
    assert mlp_labels == ["0_mlp_out", "1_mlp_out"]
    with pytest.raises(ValueError, match="mode"):
        cache.decompose_resid(mode="heads")


def test_final_accumulated_resid_through_ln_final_and_unembed_gives_the_logits(model, run):
    logits, cache = run
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "2_pre", "final_post"]
    with torch.no_grad():
        close(model.ln_final(stack[-1]) @ model.W_U, logits)
        # The logit lens: ln_final applied to each layer with that layer's own statistics
        # (TransformerLens >= 3.3), so every component unembeds like the final one.
        lens = cache.accumulated_resid(apply_ln=True)
        for i in range(4):
            close(lens[i], model.ln_final(stack[i]))
        close(lens[-1] @ model.W_U, logits, atol=1e-4)
        # At an earlier layer: centred and divided by that layer's cached scale.
        scaled = cache.accumulated_resid(layer=2, apply_ln=True)
        close(scaled[-1], cache["normalized", 2, "ln1"])
    for i in range(3):
        close(stack[i], cache["resid_pre", i], atol=0)


def test_accumulated_resid_with_incl_mid_and_labels(run):
    _, cache = run
    stack, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid", "final_post"]
    for label, component in zip(labels, stack):
        if label == "final_post":
            expected = cache["resid_post", -1]
        else:
            layer, kind = label.split("_")
            expected = cache[f"resid_{kind}", int(layer)]
        close(component, expected, atol=0)
    stack, labels = cache.accumulated_resid(layer=1, incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre"]
    _, labels = cache.accumulated_resid(layer=1, mlp_input=True, return_labels=True)
    assert labels == ["0_pre", "1_pre", "1_mid"]
    last = cache.accumulated_resid(layer=1, pos_slice=-1)
    close(last, cache.accumulated_resid(layer=1)[:, :, -1], atol=0)
    with pytest.raises(ValueError, match="layer"):
        cache.accumulated_resid(layer=7)


@pytest.fixture(scope="module")
def processed_run(tokens):
    model = make_model().process_weights_()
    return model, *model.run_with_cache(tokens)


def test_apply_ln_to_stack_and_logit_attrs_sum_to_the_logits_minus_b_U(processed_run, tokens):
    # With folded layer norms (TransformerLens's setting), the direct logit attributions
    # of a full decomposition sum to the logit minus the unembedding bias.
    model, logits, cache = processed_run
    answers = tokens.roll(-1, dims=1)  # any [batch pos] ids
    stack = cache.decompose_resid()
    attrs = cache.logit_attrs(stack, answers)
    assert attrs.shape == (stack.shape[0], BATCH, POS)
    with torch.no_grad():
        close(attrs.sum(0), logits.gather(-1, answers[..., None])[..., 0] - model.b_U[answers], atol=1e-4)
        # A single id, and a difference of two ids.
        attrs_3_minus_5 = cache.logit_attrs(stack, 3, incorrect_tokens=5)
        b_U = model.b_U[3] - model.b_U[5]
        close(attrs_3_minus_5.sum(0), logits[..., 3] - logits[..., 5] - b_U, atol=1e-4)
        # Each component's attribution is its own scaled vector dotted with the unembedding.
        scaled = cache.apply_ln_to_stack(stack)
        close(attrs[2], (scaled[2] * model.W_U[:, answers].permute(1, 2, 0)).sum(-1))
        # A stack already cut to the last position: pos_slice cuts the cached scale, and
        # the answer ids, one per prompt, are used as given (regression: they were
        # pos-sliced too, so every prompt was scored against the last prompt's answer).
        last = cache.logit_attrs(stack[:, :, -1], answers[:, -1], incorrect_tokens=answers[:, 0], pos_slice=-1)
        expected = logits[:, -1].gather(-1, answers[:, -1:])[:, 0] - logits[:, -1].gather(-1, answers[:, :1])[:, 0]
        close(last.sum(0), expected - (model.b_U[answers[:, -1]] - model.b_U[answers[:, 0]]), atol=1e-4)
        # batch_slice cuts the stack's batch axis and the cached scale alike.
        sliced = cache.logit_attrs(stack[:, :, -1], answers[1:, -1], pos_slice=-1, batch_slice=[1])
        close(sliced, attrs[:, 1:, -1])
    with pytest.raises(ValueError, match="single-token"):
        cache.logit_attrs(stack, " Hello world")


def test_apply_ln_to_stack_at_a_block_matches_that_blocks_layer_norm(model, run):
    _, cache = run
    with torch.no_grad():
        for layer in range(3):
            for kind, mlp_input in (("ln1", False), ("ln2", True)):
                stack = cache.decompose_resid(layer=layer, mlp_input=mlp_input)
                scaled = cache.apply_ln_to_stack(stack, layer=layer, mlp_input=mlp_input)
                ln = getattr(model.blocks[layer], kind)
                close(scaled.sum(0), cache["normalized", layer, kind])  # before weight and bias
                close(scaled.sum(0) * ln.weight + ln.bias, ln(stack.sum(0)))
    _, partial = model.run_with_cache(torch.tensor([[1, 2, 3]]), names_filter="hook_embed")
    with pytest.raises(KeyError, match="ln_final.hook_scale"):
        partial.apply_ln_to_stack(partial["embed"][None])


def test_stack_head_results_with_remainder_sums_to_resid_post(model, run):
    _, cache = run
    stack, labels = cache.stack_head_results(incl_remainder=True, return_labels=True)
    assert labels == [f"L{l}H{h}" for l in range(3) for h in range(4)] + ["remainder"]
    assert stack.shape == (13, BATCH, POS, model.cfg.d_model)
    close(stack.sum(0), cache["resid_post", -1])
    close(stack[labels.index("L1H2")], cache["result", 1][:, :, 2], atol=0)
    # The remainder is what no head wrote: embeddings, MLPs and the attention output biases.
    with torch.no_grad():
        expected = cache["embed"] + cache["pos_embed"] + sum(cache["mlp_out", l] + model.blocks[l].attn.b_O for l in range(3))
    close(stack[-1], expected)
    to_layer_2 = cache.stack_head_results(layer=2, incl_remainder=True)
    assert to_layer_2.shape[0] == 9
    close(to_layer_2.sum(0), cache["resid_pre", 2])


def test_stack_head_results_computes_results_from_hook_z_when_not_cached(model, tokens, run):
    _, full = run
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: not n.endswith("hook_result"))
    assert not any(name.endswith("hook_result") for name in cache)
    stack = cache.stack_head_results()
    close(stack, full.stack_head_results())
    for layer in range(3):
        close(cache["result", layer], full["result", layer])


def test_stack_head_results_with_ln_and_logit_attrs(processed_run, tokens):
    model, logits, cache = processed_run
    stack = cache.stack_head_results(incl_remainder=True)
    attrs = cache.logit_attrs(stack, tokens)
    with torch.no_grad():
        close(attrs.sum(0), logits.gather(-1, tokens[..., None])[..., 0] - model.b_U[tokens], atol=1e-4)


# Batch dimension and device.


def test_remove_batch_dim(model, tokens):
    one = tokens[:1]
    logits, cache = model.run_with_cache(one, remove_batch_dim=True)
    full_logits, full = model.run_with_cache(one)
    assert logits.shape == (1, POS, model.cfg.d_vocab)  # the output keeps its batch axis
    close(logits, full_logits, atol=0)
    for name in default_names(model):
        close(cache[name], full[name][0], atol=0)
    assert cache["pattern", 0].shape == (model.cfg.n_heads, POS, POS)
    close(cache.decompose_resid().sum(0), cache["resid_post", -1])
    close(cache.stack_head_results(incl_remainder=True).sum(0), cache["resid_post", -1])
    stack = cache.apply_ln_to_stack(cache.accumulated_resid())
    close(stack[-1], cache["ln_final.hook_normalized"])
    assert full.remove_batch_dim() is full and not full.has_batch_dim
    close(full["resid_mid", 1], cache["resid_mid", 1], atol=0)
    with pytest.raises(ValueError, match="batch of 1"):
        model.run_with_cache(tokens, remove_batch_dim=True)
    _, two = model.run_with_cache(tokens, names_filter="hook_embed")
    with pytest.raises(ValueError, match="batch dimension"):
        two.remove_batch_dim()
    _, grads = model.run_with_cache(one, names_filter="blocks.0.hook_resid_post", remove_batch_dim=True, incl_bwd=True)
    model.zero_grad()
    assert grads["blocks.0.hook_resid_post_grad"].shape == (POS, model.cfg.d_model)


def test_device_and_to(model, tokens):
    # The meta device stands in for an accelerator: it shows where tensors went.
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n, device="meta")
    assert logits.device.type == "cpu"
    assert all(t.device.type == "meta" for t in cache.values())
    _, cache = model.run_with_cache(tokens, device=torch.device("cpu"))
    close(cache.decompose_resid().sum(0), cache["resid_post", -1])
    assert cache.to("meta") is cache
    assert all(t.device.type == "meta" for t in cache.values())


def test_an_attention_only_model_caches_and_decomposes(tokens):
    model = make_model(attn_only=True)
    logits, cache = model.run_with_cache(tokens)
    expected_logits, expected = reference_forward(model, tokens)
    close(logits, expected_logits)
    assert not any(("mlp" in n) or ("ln2" in n) or ("resid_mid" in n) for n in cache)
    for name in cache:
        close(cache[name], expected[name])
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "pos_embed", "0_attn_out", "1_attn_out", "2_attn_out"]
    close(stack.sum(0), cache["resid_post", -1])
    close(cache.decompose_resid(mode="attn").sum(0), cache["resid_post", -1])
    close(cache.stack_head_results(incl_remainder=True).sum(0), cache["resid_post", -1])
    acc, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "2_pre", "final_post"]
    with torch.no_grad():
        close(model.ln_final(acc[-1]) @ model.W_U, logits)
    with pytest.raises(ValueError, match="resid_mid"):
        cache.accumulated_resid(incl_mid=True)


def test_decompose_resid_with_nothing_selected_is_an_empty_stack(run):
    _, cache = run
    stack, labels = cache.decompose_resid(layer=0, mode="mlp", incl_embeds=False, return_labels=True)
    assert labels == [] and stack.shape == (0, *cache["resid_pre", 0].shape)
