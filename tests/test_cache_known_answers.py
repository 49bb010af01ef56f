"""The cache's decompositions with ``apply_ln`` and with negative layer indices, against
the layer norms computed here by hand from the residual streams they read.

The layer norms' weights are set to one (and the blocks' biases to zero), so that what a
component contributes to a block's normalised input is the component, centred, divided
by that stream's own scale: the same under our convention (which multiplies by the
weight) and TransformerLens's (which expects weights folded into the next layer).
``accumulated_resid(apply_ln=True)`` at the final layer is pinned to TransformerLens 3.3
and later: each component through ``ln_final`` with its own statistics."""

import pytest
import torch
import torch.nn.functional as F

from tests.reference_gpt2 import make_model

BATCH, POS = 2, 6


@pytest.fixture(scope="module")
def model():
    model = make_model().double()  # 3 layers
    with torch.no_grad():
        for block in model.blocks:
            for ln in (block.ln1, block.ln2):
                ln.weight.fill_(1.0)
                ln.bias.zero_()
        model.ln_final.weight.fill_(1.0)  # its bias stays random
    return model


@pytest.fixture(scope="module")
def cache(model):
    tokens = torch.randint(0, 100, (BATCH, POS), generator=torch.Generator().manual_seed(7))
    return model.run_with_cache(tokens)[1]


def scale_of(stream):
    """The layer norm's divisor for each [batch pos] vector of a residual stream."""
    return (stream.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()


def normalised_by(stack, stream):
    """Each component centred and divided by ``stream``'s scale (a unit-weight layer norm
    applied as a linear map)."""
    return (stack - stack.mean(-1, keepdim=True)) / scale_of(stream)


def close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10)


def test_layer_norm_eps_is_the_one_the_hand_scale_uses(model, cache):
    assert model.cfg.layer_norm_eps == 1e-5
    close(cache["blocks.1.ln2.hook_scale"], scale_of(cache["blocks.1.hook_resid_mid"]))


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_decompose_resid_with_ln_at_the_mlp_input_uses_ln2s_scale(model, cache, layer):
    raw, labels = cache.decompose_resid(layer=layer, mlp_input=True, return_labels=True)
    assert labels[-1] == f"{layer}_attn_out"
    mid = cache[f"blocks.{layer}.hook_resid_mid"]
    scaled = cache.decompose_resid(layer=layer, mlp_input=True, apply_ln=True)
    close(scaled, normalised_by(raw, mid))
    close(scaled.sum(0), model.blocks[layer].ln2(mid))  # unit weight, zero bias
    # The attention input reads resid_pre, with ln1's scale: a different answer.
    pre = cache[f"blocks.{layer}.hook_resid_pre"]
    raw_pre = cache.decompose_resid(layer=layer, apply_ln=False)
    close(cache.decompose_resid(layer=layer, apply_ln=True), normalised_by(raw_pre, pre))
    assert not torch.allclose(scale_of(mid), scale_of(pre))


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_accumulated_resid_with_ln_at_a_blocks_input(cache, layer):
    for mlp_input, stream in ((False, f"blocks.{layer}.hook_resid_pre"), (True, f"blocks.{layer}.hook_resid_mid")):
        raw = cache.accumulated_resid(layer=layer, mlp_input=mlp_input)
        scaled = cache.accumulated_resid(layer=layer, mlp_input=mlp_input, apply_ln=True)
        close(scaled, normalised_by(raw, cache[stream]))
        close(raw[-1], cache[stream])


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_stack_head_results_with_ln_is_each_heads_output_over_ln1s_scale(model, cache, layer):
    stack, labels = cache.stack_head_results(layer=layer, apply_ln=True, return_labels=True)
    assert len(labels) == layer * model.cfg.n_heads
    expected = []
    for l in range(layer):
        z = cache[f"blocks.{l}.attn.hook_z"]  # [batch pos head d_head]
        W = model.blocks[l].attn.out.weight  # [d_model head*d_head]
        d = model.cfg.d_head
        expected += [z[:, :, h] @ W[:, h * d:(h + 1) * d].T for h in range(model.cfg.n_heads)]
    if layer:
        close(stack, normalised_by(torch.stack(expected), cache[f"blocks.{layer}.hook_resid_pre"]))


def test_layer_minus_one_is_the_final_stream_everywhere(model, cache):
    final = cache["blocks.2.hook_resid_post"]
    for method in ("decompose_resid", "accumulated_resid"):
        stack, labels = getattr(cache, method)(layer=-1, return_labels=True)
        whole, whole_labels = getattr(cache, method)(layer=None, return_labels=True)
        assert labels == whole_labels
        close(stack, whole)
    close(cache.decompose_resid(layer=-1).sum(0), final)
    close(cache.accumulated_resid(layer=-1)[-1], final)
    close(cache.stack_head_results(layer=-1, incl_remainder=True).sum(0), final)
    assert cache.stack_head_results(layer=-1).shape[0] == model.cfg.n_layers * model.cfg.n_heads
    # The final layer norm's scale, not the last block's.
    stack = cache.decompose_resid(layer=-1)
    close(cache.apply_ln_to_stack(stack, layer=-1), normalised_by(stack, final))
    close(cache.decompose_resid(layer=-1, apply_ln=True), normalised_by(stack, final))


@pytest.mark.parametrize("layer", [-2, -3, -4])
def test_other_negative_layers_count_back_from_the_final_stream(cache, layer):
    """-1 is the final stream (TransformerLens); -2 is the input to the last block, and so on."""
    n = 3
    expected_layer = n + 1 + layer
    for method in ("decompose_resid", "accumulated_resid", "stack_head_results"):
        close(getattr(cache, method)(layer=layer), getattr(cache, method)(layer=expected_layer))
    close(cache.decompose_resid(layer=layer, mlp_input=True, apply_ln=True),
          cache.decompose_resid(layer=expected_layer, mlp_input=True, apply_ln=True))


def test_apply_ln_with_position_and_batch_slices_uses_the_matching_scale(cache):
    stack = cache.decompose_resid(layer=1, mlp_input=True)
    mid = cache["blocks.1.hook_resid_mid"]
    full = normalised_by(stack, mid)
    close(cache.decompose_resid(layer=1, mlp_input=True, apply_ln=True, pos_slice=-2), full[:, :, -2])
    close(cache.decompose_resid(layer=1, mlp_input=True, apply_ln=True, pos_slice=[0, 3]), full[:, :, [0, 3]])
    close(cache.decompose_resid(layer=1, mlp_input=True, apply_ln=True, pos_slice=slice(1, 4)), full[:, :, 1:4])
    # As in TransformerLens, batch_slice cuts the stack's batch axis as well as the scale's.
    close(cache.apply_ln_to_stack(stack[:, :, 2], layer=1, mlp_input=True, pos_slice=2, batch_slice=slice(1, 2)),
          full[:, 1:, 2])


# TransformerLens 3.3 semantics: ln_final with each component's own statistics.
def test_final_accumulated_resid_with_ln_is_ln_final_of_each_stream(model, cache):
    stack = cache.accumulated_resid()
    expected = F.layer_norm(stack, (model.cfg.d_model,), model.ln_final.weight, model.ln_final.bias, 1e-5)
    close(cache.accumulated_resid(apply_ln=True), expected)
    close(cache.accumulated_resid(layer=-1, apply_ln=True), expected)


# Mutants that survived the first mutation run (docs/testing.md), killed here.


def test_stack_head_results_with_slices_ln_and_no_batch_dim(model, cache):
    full, labels = cache.stack_head_results(layer=2, return_labels=True)
    close(cache.stack_head_results(layer=2, pos_slice=-1), full[:, :, -1])
    close(cache.stack_head_results(layer=2, pos_slice=[1, 4]), full[:, :, [1, 4]])
    scaled = normalised_by(full, cache["blocks.2.hook_resid_pre"])
    close(cache.stack_head_results(layer=2, apply_ln=True, pos_slice=-1), scaled[:, :, -1])
    empty = cache.stack_head_results(layer=0, incl_remainder=True, return_labels=True)
    assert empty[1] == ["remainder"]
    close(empty[0][-1], cache["blocks.0.hook_resid_pre"])
    close(empty[0][:-1], torch.zeros_like(empty[0][:-1]))
    tokens = torch.randint(0, 100, (1, POS), generator=torch.Generator().manual_seed(8))
    single = model.run_with_cache(tokens, remove_batch_dim=True)[1]
    stack, single_labels = single.stack_head_results(layer=2, return_labels=True)
    assert single_labels == labels and stack.shape == (len(labels), POS, model.cfg.d_model)


def test_apply_ln_to_a_stack_without_its_batch_axis_uses_the_first_sequences_scale(cache):
    stack = cache.decompose_resid(layer=1, mlp_input=True)
    full = normalised_by(stack, cache["blocks.1.hook_resid_mid"])
    close(cache.apply_ln_to_stack(stack[:, 0], layer=1, mlp_input=True, has_batch_dim=False), full[:, 0])
    close(cache.apply_ln_to_stack(stack[:, 0, 2], layer=1, mlp_input=True, pos_slice=2, has_batch_dim=False),
          full[:, 0, 2])


def test_logit_attrs_with_slices_wrong_tokens_strings_and_no_batch_axis(model, cache):
    stack = cache.decompose_resid()
    answers = torch.randint(0, 100, (BATCH, POS), generator=torch.Generator().manual_seed(9))
    wrongs = torch.randint(0, 100, (BATCH, POS), generator=torch.Generator().manual_seed(10))
    full = cache.logit_attrs(stack, answers, incorrect_tokens=wrongs)
    with torch.no_grad():
        # As in TransformerLens, the final layer norm's weight is left out (folding puts it in W_U).
        scaled = normalised_by(stack, cache["blocks.2.hook_resid_post"])
        directions = (model.W_U[:, answers] - model.W_U[:, wrongs]).permute(1, 2, 0)
        close(full, (scaled * directions).sum(-1))
    close(cache.logit_attrs(stack[:, :, -1], answers[1:, -1], incorrect_tokens=wrongs[1:, -1], pos_slice=-1,
                            batch_slice=slice(1, 2)), full[:, 1:, -1])
    close(cache.logit_attrs(stack[:, 0], answers[0], incorrect_tokens=wrongs[0], has_batch_dim=False), full[:, 0])
    # A string answer is its single token's id (GPT-2's tokenizer: "a" is 64, "," is 11).
    close(cache.logit_attrs(stack, "a", incorrect_tokens=","), cache.logit_attrs(stack, 64, incorrect_tokens=11))


def test_decompose_resid_with_mlp_input_at_the_final_layer_is_the_final_stream(cache):
    close(cache.decompose_resid(mlp_input=True), cache.decompose_resid())
    close(cache.decompose_resid(mlp_input=True).sum(0), cache["blocks.2.hook_resid_post"])


def test_accumulated_resid_with_ln_and_a_position_and_a_cache_without_its_batch_axis(model, cache):
    full = cache.accumulated_resid(layer=1, mlp_input=True, apply_ln=True)
    close(cache.accumulated_resid(layer=1, mlp_input=True, apply_ln=True, pos_slice=-1), full[:, :, -1])
    tokens = torch.randint(0, 100, (1, POS), generator=torch.Generator().manual_seed(11))
    batched = model.run_with_cache(tokens)[1]
    single = model.run_with_cache(tokens, remove_batch_dim=True)[1]
    for method, kwargs in (("accumulated_resid", dict(layer=2, apply_ln=True)),
                           ("decompose_resid", dict(layer=1, mlp_input=True, apply_ln=True)),
                           ("stack_head_results", dict(layer=2, apply_ln=True))):
        for pos_slice in (None, -2, [0, 3]):
            expected = getattr(batched, method)(pos_slice=pos_slice, **kwargs)[:, 0]
            close(getattr(single, method)(pos_slice=pos_slice, **kwargs), expected)
