"""Weight processing changes the model it is given and nothing else: not a state dict the
caller holds, not another model sharing its tensors. Layer norms and biases are perturbed
so that every step has something to move."""

import pytest
import torch

from hooked_gpt2 import GPT2Config, HookedGPT2, processing
from tests.perturbed import perturb_biases_and_norms

STEPS = {
    "process_weights_": lambda model: model.process_weights_(refactor_factored_attn_matrices=True),
    "fold_ln": processing.fold_ln,
    "center_writing_weights": processing.center_writing_weights,
    "center_unembed": processing.center_unembed,
    "fold_value_biases": processing.fold_value_biases,
    "refactor_factored_attn_matrices": processing.refactor_factored_attn_matrices,
}


def perturbed_state(tie_embeddings: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config(n_layers=2, d_model=32, n_heads=4, n_ctx=16, d_vocab=97,
                                  tie_embeddings=tie_embeddings))
    perturb_biases_and_norms(model)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def sharing(state: dict[str, torch.Tensor], cfg: GPT2Config) -> HookedGPT2:
    """A model whose parameters *are* ``state``'s tensors (``load_state_dict(assign=True)``)."""
    model = HookedGPT2(cfg).eval()
    model.load_state_dict(state, assign=True)
    return model


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("step", STEPS)
def test_processing_leaves_shared_tensors_and_other_models_untouched(step, tied):
    cfg = GPT2Config(n_layers=2, d_model=32, n_heads=4, n_ctx=16, d_vocab=97, tie_embeddings=tied)
    state = perturbed_state(tied)
    before = {name: tensor.clone() for name, tensor in state.items()}
    model, other = sharing(state, cfg), sharing(state, cfg)
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        other_logits = other(tokens)
        STEPS[step](model)
        for name, tensor in state.items():
            assert torch.equal(tensor, before[name]), f"{step} wrote into the caller's {name}"
        assert torch.equal(other(tokens), other_logits), f"{step} changed another model"
        # and the step still did its job on the model it was given
        torch.testing.assert_close(model(tokens).log_softmax(-1), other_logits.log_softmax(-1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["gpt2", "no_biases", "llama", "attn_only_rotary", "qk_norm"])
def test_a_step_on_a_state_dict_gives_the_state_of_a_model_processed_in_place(variant):
    """model.step(state_dict) (TransformerLens's form) returns exactly the state of a copy
    of the model processed by model.step() (ours), at every stage of a chain of steps."""
    import copy

    from tests.reference_variants import make_variant

    model = make_variant(variant)
    rms = model.cfg.norm == "rmsnorm"
    steps = [("fold_layer_norm", dict(center_weights=not rms)), ("center_unembed", {}), ("fold_value_biases", {})]
    steps += [] if rms else [("center_writing_weights", {})]
    steps += [] if model.cfg.positional == "rotary" or model.cfg.qk_norm else [("refactor_factored_attn_matrices", {})]
    state, in_place = model.state_dict(), copy.deepcopy(model)
    before = {name: t.clone() for name, t in state.items()}
    for step, options in steps:
        state = getattr(model, step)(state, **options)
        getattr(in_place, step)(**options)
        expected = in_place.state_dict()
        assert sorted(state) == sorted(expected), step
        for name in expected:
            assert torch.equal(state[name], expected[name]), (step, name)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())  # the model itself untouched
