"""HookedGPT2 and GPT2Config: config checks and presets, parameter counts, init, per-head
weight views, circuits, loss, token checks, and the offline tokenizer. Logits are pinned
to the independent slow forward in ``reference_gpt2``."""

import math
import socket

import pytest
import torch

from hooked_gpt2 import ConfigError, GPT2Config, HookedGPT2, tokenizer
from hooked_gpt2.config import PRESETS
from tests.reference_gpt2 import reference_forward, reference_loss

SMALL = dict(n_layers=3, d_model=32, n_heads=4, d_head=6, d_mlp=40, n_ctx=16, d_vocab=100, init_std=0.3)


def make_model(**overrides) -> HookedGPT2:
    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config(**{**SMALL, **overrides})).eval()
    with torch.no_grad():  # non-zero biases and layer-norm weights, so none can be dropped silently
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_final"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def random_tokens(batch=2, pos=7, d_vocab=100, seed=1):
    return torch.randint(0, d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


def meta_model(cfg: GPT2Config) -> HookedGPT2:
    with torch.device("meta"):  # shapes without memory or init time
        return HookedGPT2(cfg)


def count(model: HookedGPT2) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights count once


# Config.


def test_config_defaults_and_presets():
    cfg = GPT2Config()
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.n_ctx, cfg.d_vocab) == (
        12, 768, 12, 64, 3072, 1024, 50257,
    )
    assert cfg.act_fn == "gelu_new" and cfg.tie_embeddings and cfg.qkv_bias and not cfg.attn_only
    tiny = GPT2Config.preset("tiny", d_vocab=100, n_ctx=32)
    assert (tiny.n_layers, tiny.d_model, tiny.n_heads, tiny.d_head, tiny.d_vocab, tiny.n_ctx) == (2, 128, 4, 32, 100, 32)
    untied = GPT2Config.preset("gpt2-small-untied")
    assert not untied.tie_embeddings and not untied.qkv_bias
    assert GPT2Config.preset("attn-only-2l").attn_only
    assert GPT2Config.preset("gpt2-xl").d_head == 64
    for name in PRESETS:
        cfg = GPT2Config.preset(name)
        assert cfg.d_head * cfg.n_heads == cfg.d_model
        assert cfg.d_mlp == 4 * cfg.d_model if cfg.mlp == "gelu" else 3 * cfg.d_mlp < 8.5 * cfg.d_model


def test_config_round_trips_through_json(tmp_path):
    cfg = GPT2Config.preset("tiny", dropout=0.2, d_head=16)
    cfg.to_json(tmp_path / "config.json")
    assert GPT2Config.from_json(tmp_path / "config.json") == cfg
    assert GPT2Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_layers=0), "n_layers"),
        (dict(d_model=-8), "d_model"),
        (dict(n_heads=2.0), "n_heads"),
        (dict(n_ctx=True), "n_ctx"),
        (dict(d_vocab=None), "d_vocab"),
        (dict(d_model=100, n_heads=12), "divisible"),
        (dict(act_fn="relu"), "act_fn"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
    ],
)
def test_bad_configs_raise_config_error_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        GPT2Config(**overrides)


def test_unknown_presets_and_fields_are_config_errors():
    with pytest.raises(ConfigError, match="gpt2-small"):
        GPT2Config.preset("gpt2-smal")
    with pytest.raises(ConfigError, match="n_layer"):
        GPT2Config.from_dict({"n_layer": 2})
    assert issubclass(ConfigError, ValueError)


# Parameter counts.


def test_gpt2_small_parameter_counts():
    small = GPT2Config.preset("gpt2-small")
    untied = GPT2Config.preset("gpt2-small-untied")
    assert small.n_params() == 124_439_808
    assert untied.n_params() == 163_009_536
    assert count(meta_model(small)) == 124_439_808
    assert count(meta_model(untied)) == 163_009_536
    # Without embeddings: 12 blocks of 7,087,872 plus the final layer norm.
    assert small.n_params(embeddings=False) == 12 * 7_087_872 + 2 * 768 == 85_056_000


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_parameter_count_matches_the_model(name):
    cfg = GPT2Config.preset(name)
    model = meta_model(cfg)
    assert model.n_params() == cfg.n_params() == count(model)
    embeddings = {"embed.weight", "pos_embed.weight", "unembed.weight"}
    body = sum(p.numel() for n, p in model.named_parameters() if n not in embeddings)
    assert cfg.n_params(embeddings=False) == body


@pytest.mark.parametrize("overrides", [dict(), dict(qkv_bias=False), dict(tie_embeddings=False), dict(attn_only=True)])
def test_parameter_count_of_variants(overrides):
    cfg = GPT2Config(**{**SMALL, **overrides})
    assert count(meta_model(cfg)) == cfg.n_params()


# Initialisation.


def test_init_is_gpt2s():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layers=8, d_model=256, n_heads=4, n_ctx=64, d_vocab=512, tie_embeddings=False)
    model = HookedGPT2(cfg)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    for name, param in model.named_parameters():
        if name.endswith(("attn.out.weight", "mlp.fc_out.weight")):
            expected = residual_std
        elif name.endswith("weight") and ("ln" in name.split(".")[-2]):
            assert (param == 1).all(), name
            continue
        elif name.endswith("bias"):
            assert (param == 0).all(), name
            continue
        else:
            expected = 0.02
        assert abs(param.mean().item()) < 4 * expected / math.sqrt(param.numel()), name
        assert param.std().item() == pytest.approx(expected, rel=0.03), name
    assert model.blocks[0].attn.out.weight.std() < 0.3 * model.blocks[0].attn.qkv.weight.std()


def test_init_std_is_configurable():
    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config(n_layers=2, d_model=128, n_heads=4, n_ctx=16, d_vocab=1000, init_std=0.1))
    assert model.W_E.std().item() == pytest.approx(0.1, rel=0.03)
    assert model.blocks[0].mlp.fc_out.weight.std().item() == pytest.approx(0.1 / 2, rel=0.03)


# Logits against the independent reference.


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(qkv_bias=False), dict(tie_embeddings=False), dict(attn_only=True), dict(act_fn="gelu"), dict(d_head=8)],
    ids=["default", "no-qkv-bias", "untied", "attn-only", "erf-gelu", "d_head=d_model/n_heads"],
)
def test_logits_match_an_independent_slow_forward(overrides):
    model = make_model(**overrides)
    tokens = random_tokens()
    expected, _ = reference_forward(model, tokens)
    torch.testing.assert_close(model(tokens), expected, atol=1e-5, rtol=1e-5)
    # Causal: a position's logits do not depend on later tokens.
    changed = tokens.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 100
    torch.testing.assert_close(model(changed)[:, :4], model(tokens)[:, :4], atol=1e-6, rtol=1e-6)


def test_tiny_preset_runs_at_full_context():
    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config.preset("tiny", d_vocab=100, n_ctx=32)).eval()
    tokens = random_tokens(batch=1, pos=32)
    expected, _ = reference_forward(model, tokens)
    torch.testing.assert_close(model(tokens), expected, atol=1e-5, rtol=1e-5)


# Per-head weights.


def shares_storage(view: torch.Tensor, base: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def test_per_head_weights_have_their_shapes_and_are_views():
    model = make_model()
    cfg, attn, mlp = model.cfg, model.blocks[1].attn, model.blocks[1].mlp
    H, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
    for name in ("W_Q", "W_K", "W_V"):
        assert getattr(attn, name).shape == (H, d, dh)
        assert shares_storage(getattr(attn, name), attn.qkv.weight)
    for name in ("b_Q", "b_K", "b_V"):
        assert getattr(attn, name).shape == (H, dh)
        assert shares_storage(getattr(attn, name), attn.qkv.bias)
    assert attn.W_O.shape == (H, dh, d) and shares_storage(attn.W_O, attn.out.weight)
    assert attn.b_O.shape == (d,)
    assert mlp.W_in.shape == (d, cfg.d_mlp) and shares_storage(mlp.W_in, mlp.fc_in.weight)
    assert mlp.W_out.shape == (cfg.d_mlp, d) and shares_storage(mlp.W_out, mlp.fc_out.weight)
    assert model.W_E.shape == (cfg.d_vocab, d) and model.W_pos.shape == (cfg.n_ctx, d)
    assert model.W_U.shape == (d, cfg.d_vocab) and shares_storage(model.W_U, model.W_E)  # tied
    assert not shares_storage(make_model(tie_embeddings=False).W_U, model.W_E)
    # Model-level stacks over layers.
    assert model.W_Q.shape == (cfg.n_layers, H, d, dh) and model.W_O.shape == (cfg.n_layers, H, dh, d)
    assert model.b_Q.shape == (cfg.n_layers, H, dh) and model.b_O.shape == (cfg.n_layers, d)
    assert model.W_in.shape == (cfg.n_layers, d, cfg.d_mlp) and model.b_out.shape == (cfg.n_layers, d)
    torch.testing.assert_close(model.W_V[1], attn.W_V, atol=0, rtol=0)


def test_writing_through_a_per_head_view_changes_the_fused_weights():
    model = make_model()
    attn = model.blocks[0].attn
    H, dh = model.cfg.n_heads, model.cfg.d_head
    with torch.no_grad():
        for which, (w_name, b_name) in enumerate([("W_Q", "b_Q"), ("W_K", "b_K"), ("W_V", "b_V")]):
            getattr(attn, w_name)[2, 5, 3] = 100.0 + which  # head 2, residual dim 5, d_head 3
            getattr(attn, b_name)[1, 4] = -100.0 - which
            assert attn.qkv.weight[(which * H + 2) * dh + 3, 5] == 100.0 + which
            assert attn.qkv.bias[(which * H + 1) * dh + 4] == -100.0 - which
        attn.W_O[3, 1, 7] = 42.0  # head 3, d_head 1, residual dim 7
        assert attn.out.weight[7, 3 * dh + 1] == 42.0
        model.blocks[0].mlp.W_in[2, 9] = 7.0
        assert model.blocks[0].mlp.fc_in.weight[9, 2] == 7.0
        model.blocks[0].mlp.W_out[9, 2] = 8.0
        assert model.blocks[0].mlp.fc_out.weight[2, 9] == 8.0
    # The forward pass, which reads the fused weights, still agrees with the reference.
    tokens = random_tokens()
    torch.testing.assert_close(model(tokens), reference_forward(model, tokens)[0], atol=1e-4, rtol=1e-5)


def test_per_head_weights_agree_with_the_fused_computation():
    model = make_model()
    tokens = random_tokens()
    _, cache = model.run_with_cache(tokens)
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            attn, mlp = block.attn, block.mlp
            x = cache["normalized", layer, "ln1"] * block.ln1.w + block.ln1.b  # hook_normalized precedes w, b
            for short, W, b in (("q", attn.W_Q, attn.b_Q), ("k", attn.W_K, attn.b_K), ("v", attn.W_V, attn.b_V)):
                per_head = torch.einsum("bpd,hde->bphe", x, W) + b
                torch.testing.assert_close(per_head, cache[short, layer], atol=1e-5, rtol=1e-5)
            result = torch.einsum("bphe,hed->bphd", cache["z", layer], attn.W_O)
            cache.compute_head_results()  # hook_result is cached only with set_use_attn_result
            torch.testing.assert_close(result, cache["result", layer], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(result.sum(2) + attn.b_O, cache["attn_out", layer], atol=1e-5, rtol=1e-5)
            pre = (cache["normalized", layer, "ln2"] * block.ln2.w + block.ln2.b) @ mlp.W_in + mlp.b_in
            torch.testing.assert_close(pre, cache["pre", layer], atol=1e-5, rtol=1e-5)
            out = cache["post", layer] @ mlp.W_out + mlp.b_out
            torch.testing.assert_close(out, cache["mlp_out", layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache["embed"], model.W_E[tokens])
        torch.testing.assert_close(cache["pos_embed"][0], model.W_pos[: tokens.shape[1]])


def test_b_q_of_a_model_without_qkv_bias_is_zeros():
    attn = make_model(qkv_bias=False).blocks[0].attn
    assert attn.qkv.bias is None
    assert (attn.b_Q == 0).all() and attn.b_K.shape == (4, 6)


def test_qk_and_ov_circuits_match_direct_computation():
    model = make_model()
    attn = model.blocks[2].attn
    torch.manual_seed(3)
    x_query, x_key = torch.randn(5, model.cfg.d_model), torch.randn(4, model.cfg.d_model)
    with torch.no_grad():
        qk, ov = model.qk_circuit(2), model.ov_circuit(2)
        assert qk.shape == ov.shape == (model.cfg.n_heads, model.cfg.d_model, model.cfg.d_model)
        for h in range(model.cfg.n_heads):
            torch.testing.assert_close(qk[h], attn.W_Q[h] @ attn.W_K[h].T)
            torch.testing.assert_close(ov[h], attn.W_V[h] @ attn.W_O[h])
            # Bilinear form: a query direction's score against a key direction, bias-free.
            q, k = x_query @ attn.W_Q[h], x_key @ attn.W_K[h]
            torch.testing.assert_close(x_query @ qk[h] @ x_key.T, q @ k.T, atol=1e-4, rtol=1e-5)
            # What head h writes for each source direction, through the fused out projection.
            z = torch.zeros(5, model.cfg.n_heads * model.cfg.d_head)
            z[:, h * model.cfg.d_head : (h + 1) * model.cfg.d_head] = x_query @ attn.W_V[h]
            torch.testing.assert_close(x_query @ ov[h], attn.out(z) - attn.out.bias, atol=1e-4, rtol=1e-5)


# Loss.


def test_loss_is_the_hand_computed_cross_entropy():
    model = make_model()
    tokens = random_tokens(pos=9)
    logits, _ = reference_forward(model, tokens[:, :-1])
    expected = reference_loss(torch.cat([logits, logits[:, :1]], 1), tokens)  # the appended row is unused
    per_token = model.loss(tokens, per_token=True)
    assert per_token.shape == (2, 8)
    torch.testing.assert_close(per_token, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.loss(tokens), expected.mean(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model.loss(tokens[:, :1])


def test_loss_takes_a_full_context_plus_the_last_target():
    # Regression: loss() used to reject n_ctx + 1 tokens, though it feeds the model only the
    # first n_ctx; so training could never reach the last position embedding.
    model = make_model()
    n_ctx = model.cfg.n_ctx
    tokens = random_tokens(pos=n_ctx + 1)
    logits, _ = reference_forward(model, tokens[:, :-1])
    expected = reference_loss(torch.cat([logits, logits[:, :1]], 1), tokens)
    torch.testing.assert_close(model.loss(tokens, per_token=True), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="n_ctx"):
        model.loss(random_tokens(pos=n_ctx + 2))
    with pytest.raises(ValueError, match="out of range"):  # targets are checked too
        model.loss(torch.cat([tokens[:, :-1], torch.full((2, 1), 100)], 1))


# Token checks.


@pytest.mark.parametrize(
    "tokens, message",
    [
        (torch.tensor([[1, 2, 100]]), "token id 100 is out of range"),
        (torch.tensor([[1, -1, 2]]), "token id -1 is out of range"),
        (torch.zeros(1, 17, dtype=torch.long), "n_ctx=16"),
        (torch.zeros(2, 0, dtype=torch.long), "empty"),
        (torch.zeros(0, 5, dtype=torch.long), "empty"),
        (torch.tensor([[1.0, 2.0]]), "integer ids"),
        (torch.zeros(1, 2, 3, dtype=torch.long), "shape"),
    ],
    ids=["too-high", "negative", "too-long", "no-positions", "no-sequences", "float", "3-d"],
)
def test_bad_tokens_raise_a_clear_value_error(tokens, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        model(tokens)
    with pytest.raises(ValueError, match=message):
        model.run_with_cache(tokens)


def test_tokens_may_be_a_list_or_a_1d_tensor():
    model = make_model()
    expected = model(torch.tensor([[3, 1, 4]]))
    torch.testing.assert_close(model([3, 1, 4]), expected, atol=0, rtol=0)
    torch.testing.assert_close(model(torch.tensor([3, 1, 4], dtype=torch.int32)), expected, atol=0, rtol=0)


# Tokenizer.


@pytest.fixture(scope="module")
def text_model() -> HookedGPT2:
    return make_model()  # to_tokens does not look at d_vocab


def test_tokenizer_gives_gpt2s_ids(text_model):
    enc = tokenizer.get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert text_model.to_tokens("Hello world", prepend_bos=False).tolist() == [[15496, 995]]
    assert text_model.to_tokens("Every effort moves you").tolist() == [[50256, 6109, 3626, 6100, 345]]


def test_to_tokens_to_str_tokens_and_to_string_round_trip(text_model):
    text = "Every effort moves you, naïvely — 42 times!\n  done"
    tokens = text_model.to_tokens(text, prepend_bos=False)
    assert text_model.to_string(tokens[0]) == text
    assert text_model.to_string(tokens) == [text]
    assert "".join(text_model.to_str_tokens(text, prepend_bos=False)) == text
    assert text_model.to_str_tokens("Hello world") == ["<|endoftext|>", "Hello", " world"]
    assert text_model.to_str_tokens(torch.tensor([[15496, 995]])) == ["Hello", " world"]
    assert text_model.to_str_tokens([6109, 3626]) == ["Every", " effort"]
    batch = text_model.to_tokens(["Hello world", "Every effort moves you"], prepend_bos=False)
    assert batch.tolist() == [[15496, 995, 50256, 50256], [6109, 3626, 6100, 345]]
    with pytest.raises(ValueError, match="one sequence"):
        text_model.to_str_tokens(batch)
    with pytest.raises(ValueError, match="empty"):
        text_model.to_tokens("", prepend_bos=False)
    assert text_model.to_tokens("").tolist() == [[50256]]


def test_the_tokenizer_works_with_the_network_disabled(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    tokenizer.get_tokenizer.cache_clear()
    tokenizer.load_ranks.cache_clear()
    try:
        assert tokenizer.get_tokenizer().encode("Hello world") == [15496, 995]
    finally:
        tokenizer.get_tokenizer.cache_clear()
        tokenizer.load_ranks.cache_clear()
