"""Exports with our own code (hooked_gpt2.hf_custom): every variant combination through
transformers' auto classes, generate, pipeline and Trainer, against our own logits; the
compact-vocabulary tokenizer against CompactTokenizer on the embedded corpus; and the
exports loaded in a fresh Python process where hooked_gpt2 cannot be imported."""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from data_prep.compact import choose_vocab  # noqa: E402
from data_prep.sources import SourceStats, resolve_source  # noqa: E402
from hooked_gpt2 import GPT2Config, HookedGPT2  # noqa: E402
from hooked_gpt2 import hf_custom, hf_interop  # noqa: E402
from hooked_gpt2.config import ConfigError  # noqa: E402
from hooked_gpt2.tokenizer import CompactTokenizer, get_tokenizer  # noqa: E402
from tests.conftest import shakespeare_txt  # noqa: E402

CUSTOM = hf_custom.ARCHITECTURE
PROMPT = "First Citizen: we are accounted poor"


def compact_vocab(text: str, size: int) -> list[int]:
    """The ``size``-token compact vocabulary of ``text``, as data_prep.compact chooses it."""
    counts = np.bincount(get_tokenizer().encode_ordinary(text), minlength=65536)
    return choose_vocab(counts, size)


@pytest.fixture(scope="module")
def shakespeare_vocab() -> list[int]:
    return compact_vocab(shakespeare_txt().read_text()[:50_000], 96)


# Every combination of the architecture choices, with the biases, tying, activation and
# partial rotation cycled through them so that each is on in some and off in others.
VARIANTS = []
for i, (positional, norm, mlp, qk_norm) in enumerate(
        itertools.product(["learned", "rotary"], ["layernorm", "rmsnorm"], ["gelu", "swiglu", "none"], [False, True])):
    VARIANTS.append(dict(
        positional=positional, norm=norm, mlp="gelu" if mlp == "none" else mlp, attn_only=mlp == "none",
        qk_norm=qk_norm, qkv_bias=i % 2 == 0, attn_bias=i % 3 != 0, mlp_bias=i % 4 < 2, tie_embeddings=i % 5 < 2,
        act_fn="gelu" if i % 3 == 1 else "gelu_new", rotary_dim=8 if positional == "rotary" and i % 4 == 3 else None,
    ))
# Llama's exact shape (no biases, untied): the one combination that exports as LlamaForCausalLM.
VARIANTS.append(dict(positional="rotary", norm="rmsnorm", mlp="swiglu", qkv_bias=False, attn_bias=False,
                     mlp_bias=False, tie_embeddings=False))


def variant_id(v: dict) -> str:
    mlp = "attn-only" if v.get("attn_only") else v["mlp"]
    flags = [k for k in ("qk_norm", "qkv_bias", "attn_bias", "mlp_bias", "tie_embeddings") if v.get(k)]
    return "-".join([v["positional"], v["norm"], mlp, *flags] + (["rot8"] if v.get("rotary_dim") else []))


def random_model(vocab: list[int], seed: int = 0, **variant) -> HookedGPT2:
    """A tiny model with every parameter random (norms and biases included), so that a
    misplaced or transposed tensor cannot hide behind a one or a zero."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layers=2, d_model=32, n_heads=2, n_ctx=32, d_mlp=48, d_vocab=len(vocab), vocab=vocab,
                     dropout=0.0, **variant)
    model = HookedGPT2(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    return model


def random_tokens(d_vocab: int, batch: int, pos: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


def check_export(model: HookedGPT2, path, trainer_dir) -> None:
    """The export at ``path`` through transformers, against ``model``: logits, greedy
    generation (KV cache, and a left-padded batch), pipeline, three Trainer steps, and
    from_hf back."""
    cfg = model.cfg
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tokens = random_tokens(cfg.d_vocab, 2, cfg.n_ctx)
    with torch.no_grad():
        ours = model(tokens)
        assert (hf(tokens).logits - ours).abs().max() < 1e-5
    prompt = tokens[:, :6]
    expected = model.generate(prompt, max_new_tokens=20, temperature=0)
    greedy = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(hf.generate(prompt, attention_mask=torch.ones_like(prompt), **greedy), expected)
    if hf_custom.MODEL_TYPE == hf.config.model_type:  # padding: only our modeling code reads positions from the mask
        short = model.generate(prompt[1:, 2:], max_new_tokens=20, temperature=0)
        padded = torch.cat([torch.zeros(1, 2, dtype=prompt.dtype), prompt[1:, 2:]], dim=1)
        batch = torch.cat([prompt[:1], padded])
        mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
        out = hf.generate(batch, attention_mask=mask, **greedy)
        assert torch.equal(out[0], expected[0]) and torch.equal(out[1, 2:], short[0])

    generator = transformers.pipeline("text-generation", model=str(path), trust_remote_code=True, device="cpu")
    text = generator(PROMPT, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    prompt = model.to_tokens(PROMPT, prepend_bos=False)  # HF's tokenizers add no BOS
    continuation = model.generate(prompt, max_new_tokens=8, temperature=0)[0, prompt.shape[1]:]
    assert text == model.tokenizer.decode(continuation, skip_special_tokens=True)

    back = HookedGPT2.from_hf(path)
    assert back.cfg == cfg
    with torch.no_grad():
        assert torch.equal(back(tokens), ours)

    losses = train_three_steps(hf, tokens, trainer_dir)
    assert len(losses) == 3 and losses[2] < losses[0], losses


def train_three_steps(hf, tokens: torch.Tensor, out) -> list[float]:
    """Three Trainer steps on one batch: the loss logged at each step."""
    data = [{"input_ids": row, "labels": row} for row in tokens]
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=3, per_device_train_batch_size=len(data), learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=hf.train(), args=args, train_dataset=data)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("variant", VARIANTS, ids=[variant_id(v) for v in VARIANTS])
def test_every_variant_exports_and_runs_in_transformers(variant, shakespeare_vocab, tmp_path):
    model = random_model(shakespeare_vocab, **variant)
    planned, _ = hf_interop.export_plan(model.cfg)
    fits_gpt2 = variant["positional"] == "learned" and variant["norm"] == "layernorm" and variant["mlp"] == "gelu" \
        and not variant["qk_norm"]
    fits_llama = not variant.get("attn_only") and (variant["positional"], variant["norm"], variant["mlp"]) == \
        ("rotary", "rmsnorm", "swiglu") and not variant.get("qk_norm") and not variant.get("rotary_dim")
    assert planned == ("GPT2LMHeadModel" if fits_gpt2 else "LlamaForCausalLM" if fits_llama else CUSTOM)
    exports = [hf_interop.save_hf(model, tmp_path / "export")]
    assert json.loads((exports[0] / "config.json").read_text())["architectures"] == [planned]
    assert (exports[0] / "modeling_hooked_gpt2.py").is_file() == (planned == CUSTOM)
    if planned != CUSTOM:  # our modeling code computes the native shapes too
        exports.append(hf_interop.save_hf(model, tmp_path / "custom", architecture=CUSTOM))
    for path in exports:
        check_export(model, path, tmp_path / "trainer")
