"""Generation: the KV cache changes nothing but speed; sampling is seeded and filtered."""

import pytest
import torch
from torch.nn import functional as F

from hooked_gpt2 import EOT_TOKEN, GPT2Config, HookedGPT2
from hooked_gpt2.generation import _SplitRows, sample_next


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HookedGPT2(GPT2Config(n_layers=2, d_model=64, n_heads=4, n_ctx=64)).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 50257, (3, 7), generator=torch.Generator().manual_seed(1))


def test_kv_cache_equals_recomputing_greedy(model, prompt):
    with_cache = model.generate(prompt, max_new_tokens=20, temperature=0)
    without = model.generate(prompt, max_new_tokens=20, temperature=0, use_kv_cache=False)
    assert with_cache.shape == (3, 27)
    assert torch.equal(with_cache[:, :7], prompt)
    assert torch.equal(with_cache, without)


def test_kv_cache_equals_recomputing_sampled(model, prompt):
    kwargs = dict(max_new_tokens=15, temperature=0.8, top_k=100, top_p=0.95, seed=5)
    assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_kv_cache=False, **kwargs))


def test_greedy_is_argmax_of_full_forward(model, prompt):
    out = model.generate(prompt, max_new_tokens=5, temperature=0)
    with torch.no_grad():
        logits = model(out[:, :-1])
    assert torch.equal(logits[:, 6:].argmax(-1), out[:, 7:])


def test_seeded_sampling_is_reproducible(model, prompt):
    a = model.generate(prompt, max_new_tokens=20, seed=3)
    b = model.generate(prompt, max_new_tokens=20, seed=3)
    c = model.generate(prompt, max_new_tokens=20, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 2, None, gen)) for _ in range(200)}
    assert draws == {1, 3}
    # softmax gives about [0.03, 0.64, 0.09, 0.24]: top_p=0.7 keeps the two largest.
    draws = {int(sample_next(logits, 1.0, None, 0.7, gen)) for _ in range(200)}
    assert draws == {1, 3}
    assert {int(sample_next(logits, 1.0, None, 0.5, gen)) for _ in range(50)} == {1}
    assert int(sample_next(logits, 0.0, None, None, None)) == 1


def test_string_in_string_out(model):
    text = model.generate("Every effort moves you", max_new_tokens=5, temperature=0)
    assert isinstance(text, str) and text.startswith("Every effort moves you")
    assert len(model.to_tokens(text, prepend_bos=False)[0]) >= 4


def test_stop_at_eos(model, prompt):
    # A copy whose final layer norm outputs a constant vector that only <|endoftext|>'s
    # unembedding aligns with: every row ends at the first new token.
    eos_model = HookedGPT2(model.cfg).eval()
    eos_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        eos_model.ln_final.weight.zero_()
        eos_model.ln_final.bias.fill_(1.0)
        eos_model.unembed.weight[EOT_TOKEN] = 100.0
    stopped = eos_model.generate(prompt, max_new_tokens=10, temperature=0, stop_at_eos=True)
    assert stopped.shape == (3, 8) and (stopped[:, 7] == EOT_TOKEN).all()
    running_on = eos_model.generate(prompt, max_new_tokens=10, temperature=0)
    assert running_on.shape == (3, 17)


def test_errors(model, prompt):
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        model.generate(prompt, max_new_tokens=60)
    with pytest.raises(ValueError, match="out of range"):
        model.generate(torch.tensor([[50257]]), max_new_tokens=1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, max_new_tokens=1, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, max_new_tokens=1, top_p=0)
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate("", max_new_tokens=1)


def test_generation_leaves_the_model_as_it_was(model, prompt):
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    model.train()
    model.generate(prompt, max_new_tokens=3, temperature=0)
    assert model.training
    model.eval()
    assert all("forward" not in vars(m) for m in linears), "decoding's split products must be removed"
    with pytest.raises(ValueError):
        model.generate(prompt, max_new_tokens=1, top_k=0)
    assert all("forward" not in vars(m) for m in linears)


def test_hooks_apply_during_generation(model, prompt):
    seen = []

    def record(resid, hook):
        seen.append(resid.shape[1])

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", record)]):
        model.generate(prompt, max_new_tokens=3, temperature=0)
    assert seen == [7, 1, 1]  # the prompt, then one new position per step (the KV cache)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("d_out", [48, 49, 2])
def test_split_products_equal_f_linear(threads, bias, d_out):
    """Decoding's batched product over row slices (with the rows that do not divide evenly
    done apart) is F.linear, for few rows and for the many rows that fall back to it."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, d_out, bias=bias)
    if d_out == 49:  # a weight that is a transposed view, as a user's assignment may leave it
        linear.weight = torch.nn.Parameter(torch.randn(24, d_out).T)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        split = _SplitRows(linear)
    finally:
        torch.set_num_threads(old)
    assert split.parts == max(2, threads)
    for shape in [(1, 1, 24), (4, 1, 24), (2, 3, 24), (5, 24), (3, 40, 24)]:
        x = torch.randn(shape)
        torch.testing.assert_close(split(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-6)
        assert split(x).shape == (*shape[:-1], d_out)


def test_kv_cache_decoding_reads_nothing_back_per_token(tiny_model):
    # Each value read off a GPU tensor waits for the GPU: the range check of every decoded
    # token used to read two (min and max). Ids the model sampled itself are not re-checked.
    from benchmarks.syncs import HostReads

    prompt = torch.tensor([[464, 2068, 7586]])
    reads = {}
    for new in (2, 12):
        with HostReads() as counter:
            tiny_model.generate(prompt, new, temperature=0, seed=0)
        reads[new] = counter.total
    assert reads[2] == reads[12] <= 2, reads  # the prompt's range check only
    with HostReads() as counter:
        tiny_model.generate(prompt, 12, temperature=0.8, top_k=5, top_p=0.9, seed=0)
    assert counter.total == reads[2]


def test_a_kv_cache_given_by_hand_still_checks_ids(tiny_model):
    from hooked_gpt2.generation import KVCache

    cache = KVCache(tiny_model.cfg, 1, 8, "cpu", torch.float32)
    tiny_model(torch.tensor([[1, 2]]), kv_cache=cache)
    with pytest.raises(ValueError, match="token id 50257 is out of range"):
        tiny_model(torch.tensor([[50257]]), kv_cache=cache)
