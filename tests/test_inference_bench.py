"""The inference study in its quick mode computes every exactness column, and the
optimisations it measures keep the model's answers: the KV cache and speculative decoding
give the greedy tokens of recomputing, the casts change the loss by what their precision
allows. Timings are printed by the study, never asserted here."""

import importlib.util
import math

import pytest
import torch

from benchmarks import inference
from hooked_gpt2 import GPT2Config, HookedGPT2
from hooked_gpt2.generation import speculative_greedy


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("inference")
    skip = ["compiled", "batch_32", "batch_32_bf16", "batch_32_int8", "speculative_int8"]
    rows = inference.main(["--quick", "--skip", *skip, "--out", str(out)])
    return {row.setting.name: row for row in rows}, out


def test_quick_study_fills_every_exactness_column(rows):
    by_name, out = rows
    assert {"no_cache", "kv_cache", "batch_8", "bf16_weights", "explicit_attention", "speculative"} <= set(by_name)
    for name, row in by_name.items():
        if "int8" in name and importlib.util.find_spec("torchao") is None:
            continue  # the int8 rows need torchao (pip install torchao); without it they say why they failed
        assert row.status == "ok", (name, row.status)
        assert 0 <= row.tokens_identical <= 1 and math.isfinite(row.loss_change), name
        assert row.decode_tok_s > 0 and row.limit_ms_per_step > 0 and row.weight_mib > 0, name
        assert "x [" in row.speed_vs_reference and "n=1" in row.speed_vs_reference, name
    assert (out / "table.md").read_text().count("\n") == len(by_name) + 2
    assert (out / "decode.svg").read_text().startswith("<svg")


def test_exact_optimisations_keep_the_greedy_tokens_and_the_loss(rows):
    by_name, _ = rows
    for name in ("no_cache", "kv_cache", "batch_8", "explicit_attention", "speculative"):
        assert by_name[name].tokens_identical == 1.0, name
        assert abs(by_name[name].loss_change) < 1e-5, name
    assert 0 <= by_name["speculative"].acceptance <= 1
    # bf16 keeps 8 bits of mantissa: the loss moves, but by far less than the loss itself.
    assert 0 < abs(by_name["bf16_weights"].loss_change) < 0.05
    assert by_name["bf16_weights"].weight_mib == pytest.approx(by_name["kv_cache"].weight_mib / 2, rel=0.01)


def test_speculative_decoding_gives_greedy_tokens_and_accepts_its_own_drafts():
    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config(n_layers=2, d_model=32, n_heads=2, n_ctx=40, d_vocab=60)).eval()
    draft = HookedGPT2(GPT2Config(n_layers=1, d_model=16, n_heads=2, n_ctx=48, d_vocab=60)).eval()
    prompt = torch.randint(0, 60, (1, 5), generator=torch.Generator().manual_seed(3))
    expected = model.generate(prompt, 35, temperature=0)
    for k in (1, 3, 8):
        out, acceptance = speculative_greedy(model, draft, prompt, 35, k=k)
        assert torch.equal(out, expected), k
        assert 0 <= acceptance < 1, k  # an unrelated random draft gets some wrong
    out, acceptance = speculative_greedy(model, model, prompt, 35, k=4)
    assert torch.equal(out, expected) and acceptance == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "positive integer"),
    (dict(tokens=torch.zeros(2, 3, dtype=torch.long)), "one sequence"),
    (dict(max_new_tokens=50), "exceeds the context"),
    (dict(draft_vocab=61), "vocabulary"),
])
def test_speculative_decoding_refuses_bad_input(kwargs, match):
    model = HookedGPT2(GPT2Config(n_layers=1, d_model=16, n_heads=2, n_ctx=40, d_vocab=60)).eval()
    draft = HookedGPT2(GPT2Config(n_layers=1, d_model=16, n_heads=2, n_ctx=40,
                                  d_vocab=kwargs.pop("draft_vocab", 60))).eval()
    args = dict(tokens=torch.zeros(1, 3, dtype=torch.long), max_new_tokens=5, k=2) | kwargs
    with pytest.raises(ValueError, match=match):
        speculative_greedy(model, draft, args["tokens"], args["max_new_tokens"], args["k"])
