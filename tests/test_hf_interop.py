"""Parity with Hugging Face's GPT2LMHeadModel: import, export, generation, pipeline."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config as HFConfig  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402

from hooked_gpt2 import CheckpointError, GPT2Config, HookedGPT2  # noqa: E402

SHAPES = [
    dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=50257, tie_word_embeddings=True),
    dict(n_embd=48, n_layer=3, n_head=3, n_positions=40, vocab_size=321, tie_word_embeddings=False),
    dict(n_embd=32, n_layer=1, n_head=8, n_positions=24, vocab_size=97, n_inner=80, tie_word_embeddings=True,
         activation_function="gelu"),
]


def random_hf_model(seed: int, **shape) -> GPT2LMHeadModel:
    """A GPT2LMHeadModel with every parameter random, biases and layer norms included, so
    that a transposed or misplaced tensor cannot hide behind a zero or a one."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(HFConfig(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model.eval()


def random_tokens(d_vocab: int, batch: int, pos: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES)
def test_from_hf_logits_match(shape, tmp_path):
    hf = random_hf_model(0, **shape)
    tokens = random_tokens(shape["vocab_size"], 3, shape["n_positions"])
    with torch.no_grad():
        expected = hf(tokens).logits
    from_object = HookedGPT2.from_hf(hf)
    hf.save_pretrained(tmp_path)
    from_dir = HookedGPT2.from_hf(tmp_path)
    for model in (from_object, from_dir):
        assert model.cfg.tie_embeddings == shape["tie_word_embeddings"]
        with torch.no_grad():
            assert (model(tokens) - expected).abs().max() < 1e-5


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(tie_embeddings=False), dict(qkv_bias=False), dict(attn_only=True, tie_embeddings=False)],
    ids=["tied", "untied", "no-qkv-bias", "attn-only"],
)
def test_save_hf_round_trip(overrides, tmp_path):
    torch.manual_seed(1)
    cfg = GPT2Config(n_layers=2, d_model=64, n_heads=4, n_ctx=32, d_vocab=211, **overrides)
    model = HookedGPT2(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    model.save_hf(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tokens = random_tokens(cfg.d_vocab, 2, cfg.n_ctx)
    with torch.no_grad():
        ours = model(tokens)
        assert (hf(tokens).logits - ours).abs().max() < 1e-5
        back = HookedGPT2.from_hf(tmp_path)
        assert back.cfg == model.cfg
        assert torch.equal(back(tokens), ours)


def test_greedy_generation_matches_hf():
    hf = random_hf_model(2, **SHAPES[0])
    model = HookedGPT2.from_hf(hf)
    prompt = random_tokens(50257, 2, 8, seed=3)
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )
    ours = model.generate(prompt, max_new_tokens=24, temperature=0)
    assert torch.equal(ours, expected)


def test_exported_model_works_in_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config(n_layers=1, d_model=32, n_heads=2, n_ctx=64)).eval()
    model.save_hf(tmp_path)
    generator = transformers.pipeline("text-generation", model=str(tmp_path), device="cpu")
    out = generator("Every effort moves you", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert out == model.generate("Every effort moves you", max_new_tokens=6, temperature=0)


def test_exported_tokenizer_matches_ours(tmp_path):
    model = HookedGPT2(GPT2Config(n_layers=1, d_model=32, n_heads=2, n_ctx=64))
    model.save_hf(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello world! Every effort moves you.\n\n  def f(x):\treturn x**2  # ünïcödé 日本語"
    assert tokenizer(text)["input_ids"] == model.tokenizer.encode_ordinary(text)


def test_from_hf_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        HookedGPT2.from_hf(tmp_path)
    for damaged in [b"{not json", b"\xff\xfe binary"]:
        (tmp_path / "config.json").write_bytes(damaged)
        with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
            HookedGPT2.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(CheckpointError, match="'mistral' model; HookedGPT2 loads gpt2 and llama"):
        HookedGPT2.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        HookedGPT2.from_hf(tmp_path)


def train_one_step(model: HookedGPT2, tokens: torch.Tensor) -> None:
    """An optimizer step on ``model``: in-place updates of every parameter it owns."""
    model.train()
    model.loss(tokens).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.eval()


@pytest.mark.parametrize("process", [False, True], ids=["unprocessed", "processed"])
@pytest.mark.parametrize("source", ["object", "directory"])
def test_loading_leaves_the_hugging_face_model_bitwise_unchanged(source, process, tmp_path):
    """Loading (and processing, and training what was loaded) never writes into the
    caller's Hugging Face model, its files, or a HookedGPT2 loaded from it before. Tied
    embeddings and random layer norms, so that every processing step has work to do."""
    hf = random_hf_model(0, **SHAPES[2])
    hf.save_pretrained(tmp_path)
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    tokens = random_tokens(SHAPES[2]["vocab_size"], 2, SHAPES[2]["n_positions"])
    before = {name: tensor.clone() for name, tensor in hf.state_dict().items()}
    earlier = HookedGPT2.from_hf(hf)
    with torch.no_grad():
        hf_logits, earlier_logits = hf(tokens).logits, earlier(tokens)
    model = HookedGPT2.from_hf(hf if source == "object" else tmp_path, process_weights=process)
    train_one_step(model, tokens)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    with torch.no_grad():
        assert torch.equal(hf(tokens).logits, hf_logits)
        assert torch.equal(earlier(tokens), earlier_logits)
    assert files == {path.name: path.read_bytes() for path in tmp_path.iterdir()}


@pytest.mark.parametrize("overrides, stand_in", [
    (dict(qkv_bias=False), "transformer.h.1.attn.c_attn.bias"),
    (dict(attn_only=True), "transformer.h.0.mlp.c_proj.weight"),
    (dict(attn_only=True), "transformer.h.0.ln_2.weight"),
    (dict(positional="rotary", norm="rmsnorm", mlp="swiglu", qkv_bias=False, attn_bias=True, mlp_bias=False),
     "model.layers.0.self_attn.k_proj.bias"),
    (dict(positional="rotary", norm="rmsnorm", mlp="swiglu", qkv_bias=True, attn_bias=False, mlp_bias=False),
     "model.layers.1.self_attn.o_proj.bias"),
])
def test_a_native_export_changed_where_the_model_has_no_such_part_is_refused(overrides, stand_in, tmp_path):
    """Native exports write parts GPT-2 and Llama always have (absent biases, an
    attention-only model's MLP) as exact stand-ins, dropped on loading. Fine-tuned with
    transformers they stop being stand-ins: loading must refuse rather than drop them."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config.preset("tiny", d_model=32, n_heads=4, n_layers=2, n_ctx=16, **overrides)).eval()
    path = model.save_hf(tmp_path / "export")
    assert torch.equal(HookedGPT2.from_hf(path).eval()(torch.arange(8)[None]), model(torch.arange(8)[None]))
    state = load_file(path / "model.safetensors")
    assert stand_in in state, sorted(state)
    state[stand_in] = state[stand_in] + 1e-3  # what a fine-tuning step does to it
    save_file(state, path / "model.safetensors", {"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{stand_in.removeprefix('transformer.')} is no longer the stand-in"):
        HookedGPT2.from_hf(path)
