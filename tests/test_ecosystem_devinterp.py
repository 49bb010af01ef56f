"""devinterp's LLC on our model: ``llc`` runs unchanged, gives different finite LLCs
at two checkpoints of a tiny trained model, and ``hooked_gpt2.slt.create_param_masks``
selects, for each of devinterp's weight restrictions, exactly the entries of ``W_Q`` /
``W_K`` / ``W_V`` / ``W_O`` / ``W_in`` / ``W_out`` / ``W_E`` / ``W_U`` that it names."""

import copy
import math

import pytest
import torch

from hooked_gpt2 import GPT2Config, HookedGPT2
from hooked_gpt2.slt import create_param_masks

devinterp_llc = pytest.importorskip("devinterp.slt.llc")
datasets = pytest.importorskip("datasets")

CFG = dict(d_model=32, n_heads=4, n_ctx=16, d_vocab=64)
WEIGHTS = ["W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out", "b_in", "b_out", "W_E", "W_U",
           "W_pos"]


def selected(model: HookedGPT2, masks) -> dict[str, torch.Tensor]:
    """Each TransformerLens-named weight of a copy of ``model`` that is 1 where ``masks``
    select and 0 elsewhere."""
    marked = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in marked.named_parameters():
            param.zero_()
            if name in masks:
                param[... if masks[name] is None else masks[name]] = 1.0
    return {name: getattr(marked, name) for name in WEIGHTS}


@pytest.fixture(scope="module")
def untied() -> HookedGPT2:
    torch.manual_seed(0)
    return HookedGPT2(GPT2Config.preset("tiny", tie_embeddings=False, **CFG))


@pytest.mark.parametrize("layer,head,d_head", [(0, 1, None), (1, 3, None), (1, 2, 16)])
def test_a_head_restriction_selects_exactly_that_heads_q_k_v_o(untied, layer, head, d_head):
    if d_head is not None:  # heads wider than d_model / n_heads: devinterp's own GPT-2 rule assumes they are not
        untied = HookedGPT2(GPT2Config.preset("tiny", tie_embeddings=False, **{**CFG, "d_head": d_head}))
    marks = selected(untied, create_param_masks(untied, f"l{layer}h{head}"))
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
        expected = torch.zeros_like(marks[name])
        expected[layer, head] = 1.0  # [n_layers n_heads ...]
        assert torch.equal(marks[name], expected), name
    for name in set(WEIGHTS) - {"W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"}:
        assert not marks[name].any(), name  # b_O belongs to no head; nothing else is touched
    assert create_param_masks(untied, f"l{layer}g{head}").keys() == create_param_masks(untied, f"l{layer}h{head}").keys()


@pytest.mark.parametrize("restriction,chosen", [
    ("l1 attn", {("W_Q", 1), ("W_K", 1), ("W_V", 1), ("W_O", 1), ("b_Q", 1), ("b_K", 1), ("b_V", 1), ("b_O", 1)}),
    ("l0 mlp", {("W_in", 0), ("W_out", 0), ("b_in", 0), ("b_out", 0)}),
    ("embed", {("W_E", None)}),
    ("unembed", {("W_U", None)}),
    ("full", {(name, None) for name in WEIGHTS}),
    (["l0 mlp", "embed"], {("W_in", 0), ("W_out", 0), ("b_in", 0), ("b_out", 0), ("W_E", None)}),
])
def test_component_restrictions_select_exactly_their_weights(untied, restriction, chosen):
    marks = selected(untied, create_param_masks(untied, restriction))
    for name in WEIGHTS:
        layers = [layer for weight, layer in chosen if weight == name]
        expected = torch.zeros_like(marks[name])
        for layer in layers:
            expected[... if layer is None else layer] = 1.0
        assert torch.equal(marks[name], expected), name


def test_a_whole_layer_restriction_is_that_blocks_parameters(untied):
    masks = create_param_masks(untied, "l1")
    assert masks and all(name.startswith("blocks.1.") and mask is None for name, mask in masks.items())
    assert set(masks) == {name for name, _ in untied.named_parameters() if name.startswith("blocks.1.")}


@pytest.mark.parametrize("restriction,message", [
    ("l2h0", "layer 2 is out of range"), ("l0h4", "head 4 is out of range"), ("l0 moe", "unknown weight restriction"),
    ([], "empty list"), (["full", "l0"], "already selects everything"),
])
def test_restrictions_that_select_nothing_raise(untied, restriction, message):
    with pytest.raises(ValueError, match=message):
        create_param_masks(untied, restriction)


def test_embed_and_unembed_raise_on_tied_embeddings():
    tied = HookedGPT2(GPT2Config.preset("tiny", **CFG))
    for restriction in ("embed", "unembed"):
        with pytest.raises(ValueError, match="tied"):
            create_param_masks(tied, restriction)
    with pytest.raises(ValueError, match="no MLP"):
        create_param_masks(HookedGPT2(GPT2Config.preset("tiny", attn_only=True, **CFG)), "l0 mlp")


def repeated_sequences(n: int, seed: int) -> torch.Tensor:
    """Rows of a random half repeated: learnable (induction) and quick to fit."""
    half = torch.randint(0, CFG["d_vocab"], (n, CFG["n_ctx"] // 2), generator=torch.Generator().manual_seed(seed))
    return torch.cat([half, half], dim=1)


def test_llc_runs_unchanged_and_differs_between_checkpoints():
    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config.preset("tiny", **CFG))
    early = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = repeated_sequences(512, seed=1)
    for step in range(60):
        batch = train[(step * 32) % 512:][:32]
        loss = model(batch, return_type="loss")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss < early(batch, return_type="loss")  # it learnt something
    data = datasets.Dataset.from_dict({"input_ids": repeated_sequences(64, seed=2).tolist()}).with_format("torch")
    llcs = []
    for checkpoint in (early, model):
        result = devinterp_llc.llc(
            checkpoint, data, {"obs": data}, lr=1e-3, n_beta=10.0, num_chains=2, num_draws=8, batch_size=16,
            num_init_loss_batches=2, batches_per_draw=1, device="cpu",
            param_masks=create_param_masks(checkpoint, "l0h1"),
        )
        llcs.append(float(result["llc_mean"].values.mean()))
    full = devinterp_llc.llc(model, data, {"obs": data}, lr=1e-3, n_beta=10.0, num_chains=2, num_draws=8,
                             batch_size=16, num_init_loss_batches=2, batches_per_draw=1, device="cpu")
    llcs.append(float(full["llc_mean"].values.mean()))
    assert all(math.isfinite(value) for value in llcs), llcs
    assert abs(llcs[0] - llcs[1]) > 1e-3 * max(abs(llcs[0]), abs(llcs[1])), llcs
