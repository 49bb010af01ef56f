"""Architecture variants (rotary, RMSNorm, SwiGLU, QK-norm, no biases, and together):
each against the independent slow reference in tests/reference_variants.py, their hook
names and cache, the KV cache with rotary positions, training, analyses, and config.json
compatibility with checkpoints written before the variants existed."""

import json

import pytest
import torch

from analyses.ablation import ablate
from analyses.common import logit_diff
from analyses.dla import direct_logit_attribution
from analyses.heads import head_scores
from analyses.logit_lens import layer_logits, residual_stack
from analyses.patching import activation_patching
from hooked_gpt2 import ConfigError, GPT2Config, HookedGPT2
from hooked_gpt2.config import PRESETS
from hooked_gpt2.generation import KVCache
from tests.reference_variants import VARIANTS, make_variant, reference_forward

TOKENS = torch.tensor([[5, 17, 3, 99, 42, 42, 8, 1, 0, 63, 5, 17], [2, 2, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41]])
NAMES = list(VARIANTS)


# Per-head copies of the stream and the MLP's input: these fire only with set_use_attn_in,
# set_use_split_qkv_input and set_use_hook_mlp_in (as in TransformerLens).
SWITCHED = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in")


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_every_cached_activation_match_the_reference(name):
    model = make_variant(name)
    ref_logits, ref_acts = reference_forward(model, TOKENS)
    model.set_use_attn_result(True)  # so that the cache holds hook_result
    logits, cache = model.run_with_cache(TOKENS)
    torch.testing.assert_close(logits.double(), ref_logits, atol=1e-4, rtol=1e-4)
    default_hooks = {n for n in model.hook_names() if not n.endswith(SWITCHED)}
    assert default_hooks == set(ref_acts)  # no hook missing, none extra
    for hook, expected in ref_acts.items():
        torch.testing.assert_close(cache[hook].double(), expected, atol=1e-4, rtol=1e-4, msg=hook)


def test_the_new_hooks_have_transformer_lens_names():
    names = set(make_variant("everything").hook_names())
    for hook in ("attn.hook_rot_q", "attn.hook_rot_k", "attn.q_norm.hook_scale", "attn.q_norm.hook_normalized",
                 "attn.k_norm.hook_scale", "attn.k_norm.hook_normalized", "ln1.hook_scale", "ln1.hook_normalized",
                 "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"):
        assert f"blocks.1.{hook}" in names
    assert "hook_pos_embed" not in names and "ln_final.hook_scale" in names
    _, cache = make_variant("everything").run_with_cache(TOKENS)  # TransformerLens's short names
    assert cache["rot_q", 1] is cache["blocks.1.attn.hook_rot_q"]
    assert cache["pre_linear", 0] is cache["blocks.0.mlp.hook_pre_linear"]
    gpt2 = make_variant("gpt2").hook_names()
    assert not any("rot_" in n or "_norm." in n or "pre_linear" in n for n in gpt2)


# A hook each variant adds, and an edit there that changes the logits.
EDITS = {
    "rotary": "blocks.0.attn.hook_rot_k",
    "rotary_partial": "blocks.1.attn.hook_rot_q",
    "rmsnorm": "blocks.1.ln2.hook_normalized",
    "swiglu": "blocks.0.mlp.hook_pre_linear",
    "qk_norm": "blocks.0.attn.k_norm.hook_normalized",
    "everything": "blocks.1.attn.q_norm.hook_scale",
    "llama": "ln_final.hook_scale",
}


@pytest.mark.parametrize("name", list(EDITS))
def test_an_edit_at_a_new_hook_matches_the_same_edit_in_the_reference(name):
    model, hook = make_variant(name), EDITS[name]

    def edit(x):
        x[:, 2] = x[:, 2] * 3 + 0.5
        return x

    ref_logits, _ = reference_forward(model, TOKENS, edits={hook: edit})
    logits = model.run_with_hooks(TOKENS, fwd_hooks=[(hook, lambda x, hook: edit(x))])
    torch.testing.assert_close(logits.double(), ref_logits, atol=1e-4, rtol=1e-4)
    assert (logits - model(TOKENS)).abs().max() > 1e-2  # the edit mattered


@pytest.mark.parametrize("name", ["rotary", "rotary_partial", "everything", "attn_only_rotary"])
def test_kv_cache_offsets_rotary_positions(name):
    """Prefill then one token at a time gives the logits of one full pass at every
    position, and cached greedy generation equals recomputing the whole prefix."""
    model = make_variant(name)
    tokens = TOKENS[:, :10]
    full = model(tokens)
    cache = KVCache(model.cfg, tokens.shape[0], tokens.shape[1], tokens.device, torch.float32)
    steps = [model(tokens[:, :4], kv_cache=cache)] + [model(tokens[:, i : i + 1], kv_cache=cache) for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    cached = model.generate(TOKENS[:, :3], max_new_tokens=12, temperature=0)
    recomputed = model.generate(TOKENS[:, :3], max_new_tokens=12, temperature=0, use_kv_cache=False)
    assert torch.equal(cached, recomputed)


def test_rotary_attention_depends_on_relative_position_only():
    """With rotary positions and nothing else positional, shifting a sequence leaves the
    attention scores between its tokens unchanged (learned positions change them)."""
    for name, invariant in (("rotary", True), ("gpt2", False)):
        model = make_variant(name)
        seq = TOKENS[:1, :6]
        shifted = torch.cat([TOKENS[1:, :4], seq], dim=1)  # the same tokens at positions 4..9
        _, a = model.run_with_cache(seq, names_filter="blocks.0.attn.hook_attn_scores")
        _, b = model.run_with_cache(shifted, names_filter="blocks.0.attn.hook_attn_scores")
        close = torch.allclose(a["blocks.0.attn.hook_attn_scores"], b["blocks.0.attn.hook_attn_scores"][:, :, 4:, 4:],
                               atol=1e-4)
        assert close == invariant, name


@pytest.mark.parametrize("name", NAMES)
def test_a_few_training_steps_lower_the_loss(name):
    model = make_variant(name, init_std=0.02).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model.loss(TOKENS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(p.grad is not None for p in model.parameters()), "a parameter receives no gradient"


@pytest.mark.parametrize("name", NAMES)
def test_n_params_counts_the_variants_parameters(name):
    model = make_variant(name)
    assert model.n_params() == sum(p.numel() for p in model.parameters())  # a tied matrix once


def test_presets_llama_style_next_to_mini():
    assert list(PRESETS).index("llama-style") > list(PRESETS).index("mini")
    llama, demo = GPT2Config.preset("llama-style"), GPT2Config.preset("mini")
    assert (llama.positional, llama.norm, llama.mlp, llama.tie_embeddings) == ("rotary", "rmsnorm", "swiglu", False)
    assert not (llama.qkv_bias or llama.attn_bias or llama.mlp_bias or llama.qk_norm)
    assert (llama.n_layers, llama.d_model, llama.n_heads, llama.n_ctx) == (demo.n_layers, demo.d_model, demo.n_heads, demo.n_ctx)
    # SwiGLU at d_mlp 344 holds about the parameters of GPT-2's MLP at 4 d_model.
    assert abs(llama.n_params(embeddings=False) / demo.n_params(embeddings=False) - 1) < 0.02


@pytest.mark.parametrize("bad, message", [
    (dict(positional="alibi"), "positional must be one of"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(mlp="geglu"), "mlp must be one of"),
    (dict(positional="rotary", rotary_dim=5), "rotary_dim must be an even integer"),
    (dict(positional="rotary", rotary_dim=80), "rotary_dim must be an even integer"),
    (dict(positional="rotary", rotary_base=1.0), "rotary_base must be greater than 1"),
])
def test_bad_variant_settings_name_the_field(bad, message):
    with pytest.raises(ConfigError, match=message):
        GPT2Config.preset("tiny", **bad)


def test_rotary_dim_defaults_to_d_head():
    assert GPT2Config.preset("tiny", positional="rotary").rotary_dim == 32
    assert GPT2Config.preset("tiny").rotary_dim is None


@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_record_the_architecture(tmp_path, name):
    model = make_variant(name)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for field in ("positional", "norm", "mlp", "qk_norm", "attn_bias", "mlp_bias"):
        assert saved[field] == getattr(model.cfg, field)
    loaded = HookedGPT2.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    torch.testing.assert_close(loaded(TOKENS), model(TOKENS))


def test_a_checkpoint_from_before_the_variants_loads_as_gpt2(tmp_path):
    model = make_variant("gpt2")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    new = {"positional", "rotary_base", "rotary_dim", "norm", "mlp", "qk_norm", "attn_bias", "mlp_bias"}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in new}))
    loaded = HookedGPT2.from_pretrained(tmp_path)
    default = GPT2Config()
    assert all(getattr(loaded.cfg, field) == getattr(default, field) for field in new)
    torch.testing.assert_close(loaded(TOKENS), model(TOKENS))


# Analyses on every variant.


@pytest.mark.parametrize("name", NAMES)
def test_decomposition_and_final_norm_recover_the_logits(name):
    """The residual stream's components, each through the final norm (apply_ln_to_stack,
    which must not centre for RMSNorm and, as in TransformerLens, leaves the norm's weight
    and bias out), sum to the unembedded final norm's output."""
    model = make_variant(name)
    logits, cache = model.run_with_cache(TOKENS)
    stack = cache.decompose_resid(apply_ln=True)
    bias = getattr(model.ln_final, "bias", None)
    summed = stack.sum(0) * model.ln_final.w.detach() + (0 if bias is None else bias)
    torch.testing.assert_close(summed @ model.W_U, logits, atol=1e-4, rtol=1e-4)
    resid_stack, _ = residual_stack(model, cache, "post")
    torch.testing.assert_close(layer_logits(model, resid_stack[-1]), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_dla_ablation_patching_and_head_detectors_run_on_every_variant(name):
    model = make_variant(name)
    tokens = TOKENS[:1]
    dla = direct_logit_attribution(model, tokens, answer=7, wrong=9)
    with torch.no_grad():
        logits = model(tokens)[0, -1]
    assert dla.total == pytest.approx(float(logits[7] - logits[9]), abs=1e-3)
    metric = logit_diff(7, 9)
    ablated = ablate(model, tokens, heads=[(0, 1)], metric=metric)
    assert ablated != pytest.approx(float(logits[7] - logits[9]), abs=1e-6)
    corrupted = tokens.clone()
    corrupted[0, 3] = 50
    results = activation_patching(model, tokens, corrupted, metric, kinds=["resid_pre"])
    # Patching the whole clean residual stream at layer 0 restores the clean metric (1.0).
    assert results["resid_pre"][0].max() == pytest.approx(1.0, abs=1e-4)
    scores = head_scores(model, seq_len=7, batch=2)
    assert all(s.shape == (model.cfg.n_layers, model.cfg.n_heads) for s in scores.values())


@pytest.mark.parametrize("name", ["llama", "everything"])
def test_bf16_autocast_runs_the_variants_close_to_fp32(name):
    """The demo trains under bf16 autocast: the variants' norms run there in float32 (as
    LayerNorm does) and hand SDPA queries, keys and values of one dtype."""
    model = make_variant(name, init_std=0.02)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.loss(TOKENS)
        assert float(low) == pytest.approx(float(model.loss(TOKENS)), abs=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_weight_processing_keeps_the_log_probs(name):
    """fold_ln (RMSNorm included), centring where it applies and fold_value_biases leave
    every variant computing the same log-probs; RMSNorm models become RMSNormPre."""
    model = make_variant(name)
    with torch.no_grad():
        before = model(TOKENS).log_softmax(-1)
        model.process_weights_()
        torch.testing.assert_close(model(TOKENS).log_softmax(-1), before, atol=1e-4, rtol=1e-4)
    assert model.cfg.normalization_type == ("RMSPre" if model.cfg.norm == "rmsnorm" else "LNPre")
