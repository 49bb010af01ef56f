"""Hugging Face Llama interop: a tiny random LlamaForCausalLM (no download) loads with the
same logits and greedy generations, and exports back to one."""

import json
import re

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hooked_gpt2 import CheckpointError, HookedGPT2
from hooked_gpt2.config import GPT2Config
from tests.reference_variants import make_variant

TOKENS = torch.tensor([[5, 17, 3, 99, 42, 42, 8, 1, 0, 63, 5, 17], [2, 2, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41]])


def tiny_llama(**overrides) -> LlamaForCausalLM:
    # head_dim differs from hidden_size / heads, a non-default rope_theta and eps, and
    # non-trivial norm weights and biases, so that a mapping mistake shows in the logits.
    settings = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=6,
        intermediate_size=40, vocab_size=100, max_position_embeddings=24, rope_theta=500.0, rms_norm_eps=1e-5,
        initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**settings, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def greedy_hf(hf, prompt, n):
    return hf.generate(prompt, max_new_tokens=n, do_sample=False, min_new_tokens=n)


@pytest.mark.parametrize("overrides", [
    {},
    dict(attention_bias=True, mlp_bias=True),
    dict(tie_word_embeddings=True),
], ids=["llama", "biases", "tied"])
def test_from_hf_llama_matches_logits_and_greedy_generation(tmp_path, overrides):
    hf = tiny_llama(**overrides)
    hf.save_pretrained(tmp_path)
    for source in (hf, tmp_path):
        model = HookedGPT2.from_hf(source)
        assert (model.cfg.positional, model.cfg.norm, model.cfg.mlp) == ("rotary", "rmsnorm", "swiglu")
        assert model.cfg.rotary_base == 500.0 and model.cfg.d_head == 6
        with torch.no_grad():
            expected = hf(TOKENS).logits
        torch.testing.assert_close(model(TOKENS), expected, atol=1e-5, rtol=1e-5)
        prompt = TOKENS[:, :4]
        assert torch.equal(model.generate(prompt, max_new_tokens=12, temperature=0), greedy_hf(hf, prompt, 12))


@pytest.mark.parametrize("name", ["llama", "llama_qkv_bias_only", "llama_tied"])
def test_save_hf_writes_a_llama_hugging_face_loads_exactly(tmp_path, name):
    overrides = {"llama_qkv_bias_only": dict(qkv_bias=True), "llama_tied": dict(tie_embeddings=True)}.get(name, {})
    model = make_variant("llama", **overrides)
    model.save_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = hf(TOKENS).logits
    torch.testing.assert_close(model(TOKENS), expected, atol=1e-5, rtol=1e-5)
    prompt = TOKENS[:, :4]
    assert torch.equal(model.generate(prompt, max_new_tokens=12, temperature=0), greedy_hf(hf, prompt, 12))
    back = HookedGPT2.from_hf(tmp_path)  # round trip, including what Llama cannot say
    assert back.cfg == model.cfg
    torch.testing.assert_close(back(TOKENS), model(TOKENS))


def test_llama_preset_exports_with_gpt2_tokenizer_files(tmp_path):
    model = HookedGPT2(GPT2Config.preset("llama-style", n_layers=1, d_model=32, n_heads=2, d_mlp=48, n_ctx=16))
    model.save_hf(tmp_path)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 50256


def test_gpt2_without_biases_still_exports_as_gpt2(tmp_path):
    model = make_variant("no_biases", d_head=8)  # GPT-2 needs n_heads * d_head == d_model
    model.save_hf(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), hf(TOKENS).logits, atol=1e-5, rtol=1e-5)
    back = HookedGPT2.from_hf(tmp_path).cfg
    assert (back.qkv_bias, back.attn_bias, back.mlp_bias) == (False, False, False)


@pytest.mark.parametrize("name, problem", [
    ("qk_norm", "qk_norm=True"),
    ("rmsnorm", "positional='learned' \\(Llama: 'rotary'\\)"),
    ("rotary_partial", "rotary_dim=4"),
])
def test_save_hf_writes_our_own_code_where_no_hugging_face_class_fits(tmp_path, name, problem):
    make_variant(name).save_hf(tmp_path)  # tests/test_hf_custom.py runs such exports through transformers
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["HookedGPT2ForCausalLM"]
    assert (tmp_path / "modeling_hooked_gpt2.py").is_file()
    assert re.search(f"No `transformers` class computes this architecture exactly.*{problem}",
                     (tmp_path / "README.md").read_text())


def test_from_hf_refuses_what_it_cannot_represent(tmp_path):
    with pytest.raises(CheckpointError, match="grouped-query attention"):
        HookedGPT2.from_hf(tiny_llama(num_key_value_heads=2))
    with pytest.raises(CheckpointError, match="activation 'gelu'"):
        HookedGPT2.from_hf(tiny_llama(hidden_act="gelu"))
    scaled = tiny_llama()
    scaled.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    with pytest.raises(CheckpointError, match="'linear' rotary scaling"):
        HookedGPT2.from_hf(scaled)


@pytest.mark.parametrize("source", ["object", "directory"])
def test_loading_and_processing_leave_the_llama_bitwise_unchanged(source, tmp_path):
    from tests.test_hf_interop import train_one_step

    hf = tiny_llama(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    hf.save_pretrained(tmp_path)
    before = {name: tensor.clone() for name, tensor in hf.state_dict().items()}
    with torch.no_grad():
        hf_logits = hf(TOKENS).logits
    model = HookedGPT2.from_hf(hf if source == "object" else tmp_path, process_weights=True)
    train_one_step(model, TOKENS)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    with torch.no_grad():
        assert torch.equal(hf(TOKENS).logits, hf_logits)
