"""The model's forward with a KV cache: a prefill and then chunks of several new tokens
give the full forward's logits, on the fast attention path and on the explicit one a
``hook_pattern`` hook switches to (whose patterns are the full run's rows)."""

import pytest
import torch

from hooked_gpt2.generation import KVCache
from tests.reference_gpt2 import make_model

BATCH, POS = 2, 12


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 100, (BATCH, POS), generator=torch.Generator().manual_seed(3))


def chunked(model, tokens, cuts, fwd_hooks=()):
    """Logits of ``tokens`` fed through one KV cache in pieces split at ``cuts``."""
    cache = KVCache(model.cfg, tokens.shape[0], model.cfg.n_ctx, tokens.device, torch.float32)
    bounds = [0, *cuts, tokens.shape[1]]
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        pieces = [model(tokens[:, a:b], kv_cache=cache) for a, b in zip(bounds, bounds[1:])]
    assert cache.length == tokens.shape[1]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("cuts", [[5], [4, 7], [3, 4, 5, 9], [1], [11]],
                         ids=["prefill-5+chunk-7", "prefill-4+3+5", "mixed-1-token-steps", "prefill-1", "last-alone"])
@pytest.mark.parametrize("hooked", [False, True], ids=["fast-path", "hook_pattern"])
def test_prefill_then_chunks_equal_the_full_forward(model, tokens, cuts, hooked):
    with torch.no_grad():
        full = model(tokens)
    patterns = []

    def keep(pattern, hook):
        patterns.append(pattern.clone())

    hooks = [(f"blocks.{l}.attn.hook_pattern", keep) for l in range(model.cfg.n_layers)] if hooked else []
    torch.testing.assert_close(chunked(model, tokens, cuts, hooks), full, atol=1e-5, rtol=1e-5)
    if hooked:  # each chunk's pattern rows are the full run's rows for those queries
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
        bounds = [0, *cuts, POS]
        n_layers = model.cfg.n_layers
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            for layer in range(n_layers):
                got = patterns[i * n_layers + layer]
                torch.testing.assert_close(got, cache["pattern", layer][:, :, a:b, :b], atol=1e-6, rtol=1e-5)

