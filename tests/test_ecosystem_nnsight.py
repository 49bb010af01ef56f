"""nnsight traces our model as it is: reads and edits of the attention pattern and scores
(computed only when something asks for them) equal our cache and ``run_with_hooks``, and
a trace that asks for neither keeps the fused attention path."""

import pytest
import torch

from hooked_gpt2 import GPT2Config, HookedGPT2
from hooked_gpt2.model import Attention

nnsight = pytest.importorskip("nnsight")


@pytest.fixture(scope="module")
def model() -> HookedGPT2:
    torch.manual_seed(0)
    return HookedGPT2(GPT2Config.preset("tiny", d_model=32, n_heads=4, n_ctx=16, d_vocab=100)).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def count_explicit_attention(monkeypatch) -> list:
    calls = []
    explicit = Attention._explicit_attention

    def counting(self, *args):
        calls.append(self)
        return explicit(self, *args)

    monkeypatch.setattr(Attention, "_explicit_attention", counting)
    return calls


def test_pattern_and_scores_read_through_nnsight_equal_our_cache(model, tokens):
    # The same hooks asked for, so both runs take the same paths: equal to the last bit.
    names = ["blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern", "blocks.1.ln2.hook_scale"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    traced = nnsight.NNsight(model)
    with torch.no_grad(), traced.trace(tokens):
        scores = traced.blocks[1].attn.hook_attn_scores.output.save()
        pattern = traced.blocks[1].attn.hook_pattern.output.save()
        scale = traced.blocks[1].ln2.hook_scale.output.save()
        logits = traced.output.save()
    torch.testing.assert_close(scores, cache["blocks.1.attn.hook_attn_scores"], rtol=0, atol=0)
    torch.testing.assert_close(pattern, cache["blocks.1.attn.hook_pattern"], rtol=0, atol=0)
    torch.testing.assert_close(scale, cache["blocks.1.ln2.hook_scale"], rtol=0, atol=0)
    torch.testing.assert_close(logits, model(tokens))
    _, everything = model.run_with_cache(tokens)  # every hook: explicit layer norms too, the same to rounding
    torch.testing.assert_close(pattern, everything["blocks.1.attn.hook_pattern"])


def test_pattern_edit_through_nnsight_equals_the_same_edit_through_run_with_hooks(model, tokens):
    def uniform_head_2(pattern, hook):
        causal = torch.ones_like(pattern[:, 2]).tril()
        pattern[:, 2] = causal / causal.sum(-1, keepdim=True)

    expected = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", uniform_head_2)])
    assert not torch.allclose(expected, model(tokens))  # the edit matters
    traced = nnsight.NNsight(model)
    with torch.no_grad(), traced.trace(tokens):
        pattern = traced.blocks[0].attn.hook_pattern.output
        causal = torch.ones_like(pattern[:, 2]).tril()
        pattern[:, 2] = causal / causal.sum(-1, keepdim=True)
        logits = traced.output.save()
    torch.testing.assert_close(logits, expected)


def test_pattern_replaced_through_nnsight_equals_a_hook_replacement(model, tokens):
    def swap_heads(pattern, hook):
        return pattern[:, [1, 0, 2, 3]]

    expected = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_attn_scores", swap_heads)])
    traced = nnsight.NNsight(model)
    with torch.no_grad(), traced.trace(tokens):
        scores = traced.blocks[1].attn.hook_attn_scores.output
        traced.blocks[1].attn.hook_attn_scores.output = scores[:, [1, 0, 2, 3]]
        logits = traced.output.save()
    torch.testing.assert_close(logits, expected)


def test_a_trace_that_does_not_ask_for_the_pattern_keeps_the_fused_path(model, tokens, monkeypatch):
    calls = count_explicit_attention(monkeypatch)
    traced = nnsight.NNsight(model)
    with torch.no_grad(), traced.trace(tokens):
        z = traced.blocks[1].attn.hook_z.output.save()
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")
    torch.testing.assert_close(z, cache["blocks.1.attn.hook_z"])
    assert calls == []  # neither the trace nor the cache of hook_z computed a pattern
    model(tokens)  # a plain forward of the wrapped model, outside any trace
    assert calls == []
    with torch.no_grad(), traced.trace(tokens):
        traced.blocks[1].attn.hook_pattern.output.save()
    assert calls == [model.blocks[1].attn]  # only the layer asked for


def test_an_nnsight_cache_of_the_pattern_equals_ours(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    traced = nnsight.NNsight(model)
    with torch.no_grad(), traced.trace(tokens) as tracer:
        kept = tracer.cache(modules=[traced.blocks[0].attn.hook_pattern])
    torch.testing.assert_close(kept["model.blocks.0.attn.hook_pattern"].output, cache["pattern", 0], rtol=0, atol=0)
