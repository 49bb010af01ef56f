"""``--compile``: a few training steps with the model compiled give the eager run's losses
(hooks idle), and what hooks do on a compiled model (as training/README.md says).

torch.compile runs here with the ``aot_eager`` backend: Dynamo captures the same graphs and
AOTAutograd the same forward and backward as with the default inductor backend, without the
minutes of C++ code generation inductor takes on 2 CPU cores (inductor itself is run by
benchmarks/gpu_check.py)."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from hooked_gpt2 import GPT2Config, HookedGPT2
from tests.test_train import small_cfg, train_losses
from training.train import train


@pytest.fixture
def counting_compile(monkeypatch):
    """torch.compile with the aot_eager backend, counting the frames it compiles."""
    counter = CompileCounterWithBackend("aot_eager")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counter))
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


def test_compiled_training_gives_the_eager_losses(shakespeare_data, tmp_path, counting_compile):
    common = dict(max_steps=4, eval_every=2, eval_batches=1)
    eager = train(small_cfg(shakespeare_data, tmp_path / "eager", **common))
    compiled = train(small_cfg(shakespeare_data, tmp_path / "compiled", compile=True, **common))
    assert counting_compile.frame_count >= 1, "the compiled model ran"
    assert counting_compile.frame_count <= 2, "no graph breaks beyond the forward's own graph when hooks are idle"
    assert train_losses(compiled) == pytest.approx(train_losses(eager), abs=1e-5)
    assert len(train_losses(eager)) == 4


def zero(activation, hook):
    return torch.zeros_like(activation)


def test_hooks_on_a_compiled_model_act_only_if_present_when_it_is_traced(counting_compile):
    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config.preset("tiny", d_model=32, n_layers=1, n_heads=2, n_ctx=32)).eval()
    tokens = torch.randint(0, 1000, (2, 16))
    plain = model(tokens)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", zero)]):
        hooked = model(tokens)
    assert not torch.allclose(hooked, plain)

    compiled = torch.compile(model)
    assert torch.allclose(compiled(tokens), plain, atol=1e-5)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", zero)]):
        # Traced without hooks: Dynamo does not guard on module hooks by default
        # (torch._dynamo.config.skip_nnmodule_hook_guards), so the hook is silently skipped.
        assert torch.allclose(compiled(tokens), plain, atol=1e-5)
        assert torch.allclose(model(tokens), hooked, atol=1e-5), "the uncompiled module still runs hooks"
