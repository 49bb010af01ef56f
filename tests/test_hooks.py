"""Hook points: every name fires with its stated shape, edits act like hand-written ones
(checked against the independent forward in ``reference_gpt2``), both attention paths
agree, and hooks never outlive their run."""

import re

import pytest
import torch

from hooked_gpt2 import GPT2Config, HookedGPT2, HookError, HookOutputError
from hooked_gpt2.model import Attention, LayerNorm
from tests.reference_gpt2 import make_model, reference_forward

BATCH, POS = 2, 7


@pytest.fixture(scope="module")
def model() -> HookedGPT2:
    return make_model()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 100, (BATCH, POS), generator=torch.Generator().manual_seed(1))


def stated_shape(name: str, cfg: GPT2Config) -> tuple[int, ...]:
    b, p = BATCH, POS
    table = {
        r"hook_(pos_)?embed": (b, p, cfg.d_model),
        r"blocks\.\d+\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)": (b, p, cfg.d_model),
        r"(blocks\.\d+\.ln[12]|ln_final)\.hook_scale": (b, p, 1),
        r"(blocks\.\d+\.ln[12]|ln_final)\.hook_normalized": (b, p, cfg.d_model),
        r"blocks\.\d+\.attn\.hook_[qkvz]": (b, p, cfg.n_heads, cfg.d_head),
        r"blocks\.\d+\.attn\.hook_(attn_scores|pattern)": (b, cfg.n_heads, p, p),
        r"blocks\.\d+\.attn\.hook_result": (b, p, cfg.n_heads, cfg.d_model),
        r"blocks\.\d+\.mlp\.hook_(pre|post)": (b, p, cfg.d_mlp),
        r"unembed\.hook_in": (b, p, cfg.d_model),
        r"unembed\.hook_out": (b, p, cfg.d_vocab),
    }
    matches = [shape for pattern, shape in table.items() if re.fullmatch(pattern, name)]
    assert len(matches) == 1, f"no stated shape for hook {name}"
    return matches[0]


def expected_hook_names(cfg: GPT2Config) -> list[str]:
    names = ["hook_embed", "hook_pos_embed"]
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        names += [p + "hook_resid_pre", p + "ln1.hook_scale", p + "ln1.hook_normalized"]
        names += [p + f"hook_{n}" for n in ("attn_in", "q_input", "k_input", "v_input")]
        names += [p + f"attn.hook_{n}" for n in ("q", "k", "v", "attn_scores", "pattern", "z", "result")]
        names += [p + "hook_attn_out"]
        if not cfg.attn_only:
            names += [p + "hook_resid_mid", p + "hook_mlp_in", p + "ln2.hook_scale", p + "ln2.hook_normalized"]
            names += [p + "mlp.hook_pre", p + "mlp.hook_post", p + "hook_mlp_out"]
        names += [p + "hook_resid_post"]
    return names + ["ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out"]


# Hooks that fire only with a TransformerLens switch on (set_use_attn_in, ...); a hook
# attached to hook_result makes it fire regardless.
SWITCHED = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in")


def no_hooks_attached(model: HookedGPT2) -> bool:
    return all(not hook._forward_hooks for hook in model.hook_dict.values())


@pytest.mark.parametrize("attn_only", [False, True])
def test_every_hook_fires_once_with_its_stated_shape(attn_only, tokens):
    model = make_model(attn_only=attn_only)
    assert sorted(model.hook_names()) == sorted(expected_hook_names(model.cfg))
    fired = []

    def record(activation, hook):
        fired.append((hook.name, tuple(activation.shape)))

    model.run_with_hooks(tokens, fwd_hooks=[(lambda name: True, record)])
    assert sorted(name for name, _ in fired) == sorted(n for n in model.hook_names() if not n.endswith(SWITCHED))
    for name, shape in fired:
        assert shape == stated_shape(name, model.cfg), name
    # hook_names() lists hooks in the order the forward pass reaches them (a residual
    # stream's hook fires after the sublayers that feed it, so compare the rest).
    order = [n for n, _ in fired]
    assert order.index("hook_embed") < order.index("blocks.0.attn.hook_q") < order.index("blocks.0.attn.hook_pattern")
    assert order.index("blocks.0.attn.hook_pattern") < order.index("blocks.0.attn.hook_z") < order.index("blocks.0.attn.hook_result")
    if attn_only:
        assert not any("mlp" in n or "ln2" in n or "resid_mid" in n for n in model.hook_names())


def test_with_no_hook_or_identity_hooks_the_output_is_the_reference(model, tokens):
    expected, _ = reference_forward(model, tokens)
    plain = model(tokens)
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-5)
    identity = model.run_with_hooks(tokens, fwd_hooks=[(lambda name: True, lambda act, hook: None)])
    torch.testing.assert_close(identity, plain, atol=1e-5, rtol=1e-5)
    returned = model.run_with_hooks(tokens, fwd_hooks=[(lambda name: True, lambda act, hook: act)])
    torch.testing.assert_close(returned, plain, atol=1e-5, rtol=1e-5)
    assert no_hooks_attached(model)
    torch.testing.assert_close(model(tokens), plain, atol=0, rtol=0)


def zero_head(index):
    def edit(act):
        act[:, :, 1] = 0  # [batch pos head_index ...]
        return act

    return edit


def edit_pattern(act):  # [batch head_index query_pos key_pos]: head 2 attends to the first token
    act[:, 2] = 0
    act[:, 2, :, 0] = 1
    return act


EDITS = {
    "hook_embed": lambda a: a * 2,
    "hook_pos_embed": lambda a: a.flip(1),
    "blocks.0.hook_resid_pre": lambda a: a * 2,
    "blocks.0.ln1.hook_scale": lambda a: a * 3,
    "blocks.1.ln1.hook_normalized": lambda a: -a,
    "blocks.0.attn.hook_q": zero_head(1),
    "blocks.1.attn.hook_k": lambda a: a * 1.5,
    "blocks.2.attn.hook_v": zero_head(1),
    "blocks.1.attn.hook_attn_scores": lambda a: a * 0.5,
    "blocks.1.attn.hook_pattern": edit_pattern,
    "blocks.0.attn.hook_z": zero_head(1),
    "blocks.2.attn.hook_result": zero_head(1),
    "blocks.1.hook_attn_out": lambda a: a * 0,
    "blocks.0.hook_resid_mid": lambda a: a[:, :1].expand_as(a).clone(),
    "blocks.2.ln2.hook_scale": lambda a: a + 1,
    "blocks.1.mlp.hook_pre": lambda a: a.clamp(max=0),
    "blocks.0.mlp.hook_post": lambda a: a * 0,
    "blocks.2.hook_mlp_out": lambda a: a * 4,
    "blocks.1.hook_resid_post": lambda a: a.roll(1, dims=-1),
    "ln_final.hook_scale": lambda a: a * 2,
    "ln_final.hook_normalized": lambda a: a + 1,
}


@pytest.mark.parametrize("name", list(EDITS))
def test_a_hook_edit_changes_the_output_exactly_as_the_same_edit_by_hand(model, tokens, name):
    edit = EDITS[name]
    expected, _ = reference_forward(model, tokens, edits={name: edit})
    unedited = model(tokens)
    edited = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda act, hook: edit(act.clone()))])
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=1e-5)
    assert (edited - unedited).abs().max() > 1e-3, "the edit should change the logits"
    assert no_hooks_attached(model)


def test_an_in_place_edit_returning_none_also_takes_effect(model, tokens):
    def zero_in_place(act, hook):
        act[:, :, 1] = 0

    expected, _ = reference_forward(model, tokens, edits={"blocks.0.attn.hook_z": zero_head(1)})
    edited = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_in_place)])
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=1e-5)


def test_several_hooks_on_one_point_compose_in_order(model, tokens):
    name = "blocks.1.hook_resid_pre"
    expected, _ = reference_forward(model, tokens, edits={name: lambda a: (a + 1) * 3})
    got = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda a, h: a + 1), (name, lambda a, h: a * 3)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_head_results_summed_plus_output_bias_is_attn_out(model, tokens):
    model.set_use_attn_result(True)  # hook_result fires (and is cached) only when asked for
    try:
        _, cache = model.run_with_cache(tokens)
    finally:
        model.set_use_attn_result(False)
    for layer in range(model.cfg.n_layers):
        summed = cache["result", layer].sum(-2) + model.blocks[layer].attn.b_O
        torch.testing.assert_close(summed, cache["attn_out", layer], atol=1e-5, rtol=1e-5)


def test_pattern_rows_sum_to_one_and_are_zero_above_the_diagonal(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    future = torch.ones(POS, POS, dtype=torch.bool).triu(1)
    for layer in range(model.cfg.n_layers):
        pattern = cache["pattern", layer]
        torch.testing.assert_close(pattern.sum(-1), torch.ones(BATCH, model.cfg.n_heads, POS))
        assert (pattern[..., future] == 0).all()
        assert (pattern[..., ~future] > 0).all()


def test_attn_scores_are_scaled_and_masked_before_softmax(model, tokens):
    _, cache = model.run_with_cache(tokens)
    future = torch.ones(POS, POS, dtype=torch.bool).triu(1)
    for layer in range(model.cfg.n_layers):
        q, k = cache["q", layer], cache["k", layer]
        expected = torch.einsum("bqhd,bkhd->bhqk", q, k) / model.cfg.d_head**0.5
        scores = cache["attn_scores", layer]
        torch.testing.assert_close(scores[..., ~future], expected[..., ~future], atol=1e-5, rtol=1e-5)
        assert torch.isneginf(scores[..., future]).all()
        torch.testing.assert_close(scores.softmax(-1), cache["pattern", layer])


def test_the_sdpa_path_and_the_explicit_path_give_the_same_logits(model, tokens, monkeypatch):
    fast = model(tokens)  # F.layer_norm, fused QKV and scaled_dot_product_attention
    noop = lambda act, hook: None  # noqa: E731
    calls = []
    real_explicit = Attention._explicit_attention

    def counting_explicit(self, *args):
        calls.append(1)
        return real_explicit(self, *args)

    monkeypatch.setattr(Attention, "_explicit_attention", counting_explicit)
    explicit = model.run_with_hooks(
        tokens, fwd_hooks=[(lambda n: n.endswith(("hook_pattern", "hook_scale", "hook_result")), noop)]
    )
    assert len(calls) == model.cfg.n_layers, "hooking hook_pattern should switch to the explicit path"
    torch.testing.assert_close(explicit, fast, atol=1e-5, rtol=1e-5)
    # Hooking only the scores is enough to switch paths, and gives the same logits too.
    scores_only = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_attn_scores", noop)])
    assert len(calls) == model.cfg.n_layers + 1
    torch.testing.assert_close(scores_only, fast, atol=1e-5, rtol=1e-5)


def test_nothing_asked_means_fast_path_and_no_head_results(model, tokens, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("computed although nothing asked for it")

    for block in model.blocks:
        monkeypatch.setattr(block.attn.hook_result, "forward", refuse)
    monkeypatch.setattr(Attention, "_explicit_attention", refuse)
    monkeypatch.setattr(LayerNorm, "forward", _fast_layer_norm_only(LayerNorm.forward))
    model(tokens)
    names = lambda n: not n.endswith(("hook_result", "hook_pattern", "hook_attn_scores", "hook_scale", "hook_normalized"))  # noqa: E731
    _, cache = model.run_with_cache(tokens, names_filter=names)
    assert not any(name.endswith("hook_result") for name in cache)
    assert "blocks.0.attn.hook_z" in cache


def _fast_layer_norm_only(forward):
    def checked(self, x):
        assert not (self.hook_scale.has_hooks() or self.hook_normalized.has_hooks())
        return forward(self, x)

    return checked


def test_hooks_are_gone_after_an_exception_inside_a_hooked_run(model, tokens):
    before = model(tokens)

    def explode(act, hook):
        raise RuntimeError("boom")

    keep = lambda act, hook: act * 0  # noqa: E731: would wreck the output if it stayed
    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", keep), ("blocks.1.attn.hook_pattern", explode)])
    assert no_hooks_attached(model)
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", keep)], bwd_hooks=[("hook_embed", keep)]):
            assert not no_hooks_attached(model)
            raise RuntimeError("boom")
    assert no_hooks_attached(model)
    with pytest.raises(ValueError):  # an error raised by the model itself, mid-run_with_cache
        model.run_with_cache(tokens, incl_bwd=True, metric=lambda logits: logits.sum(-1))
    assert no_hooks_attached(model)
    with pytest.raises(HookError):  # the second spec is bad: the first one's hook must not stay
        model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", keep), ("hook_embd", keep)])
    assert no_hooks_attached(model)
    torch.testing.assert_close(model(tokens), before, atol=0, rtol=0)


def test_unknown_hook_names_raise_hook_error_naming_the_closest_valid_names(model, tokens):
    noop = lambda act, hook: None  # noqa: E731
    typo, meant = "blocks.1.attn.hook_patern", "blocks.1.attn.hook_pattern"
    attempts = [
        lambda: model.run_with_hooks(tokens, fwd_hooks=[(typo, noop)]),
        lambda: model.run_with_hooks(tokens, bwd_hooks=[(typo, noop)]),
        lambda: model.hooks(fwd_hooks=[(typo, noop)]).__enter__(),
        lambda: model.run_with_cache(tokens, names_filter=typo),
        lambda: model.run_with_cache(tokens, names_filter=["hook_embed", typo]),
    ]
    for attempt in attempts:
        with pytest.raises(HookError) as info:
            attempt()
        assert meant in str(info.value) and typo in str(info.value)
        assert no_hooks_attached(model)
    with pytest.raises(HookError, match="hook_names"):  # nothing close: point at the list
        model.run_with_hooks(tokens, fwd_hooks=[("zzzzzzzz", noop)])
    assert isinstance(HookError("x"), KeyError)


def test_malformed_hook_specs_raise_hook_error(model, tokens):
    with pytest.raises(HookError, match="pair"):
        model.run_with_hooks(tokens, fwd_hooks=[("hook_embed",)])
    with pytest.raises(HookError, match="direction"):
        model.hook_dict["hook_embed"].add_hook(lambda a, h: None, direction="sideways")
    assert no_hooks_attached(model)


def test_a_callable_filter_selects_hooks_by_name(model, tokens):
    seen = []
    model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("attn.hook_pattern"), lambda a, h: seen.append(h.name))])
    assert seen == [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    assert model.resolve_names(lambda n: "ln_final" in n) == ["ln_final.hook_scale", "ln_final.hook_normalized"]
    assert model.resolve_names(lambda n: False) == []


def test_hook_name_and_layer(model):
    hook = model.hook_dict["blocks.2.attn.hook_pattern"]
    assert hook.name == "blocks.2.attn.hook_pattern" and hook.layer() == 2
    assert model.hook_dict["blocks.1.ln2.hook_scale"].layer() == 1
    assert model.hook_dict["hook_embed"].layer() is None
    assert model.hook_dict["ln_final.hook_scale"].layer() is None
    assert model.blocks[0].attn.hook_q is model.hook_dict["blocks.0.attn.hook_q"]
    for name, hook in model.hook_dict.items():
        assert hook.name == name


def test_a_hook_is_given_its_hook_point(model, tokens):
    got = []
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.mlp.hook_post", lambda a, h: got.append((h.name, h.layer())))])
    assert got == [("blocks.1.mlp.hook_post", 1)]


def _loss(logits, tokens):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


@pytest.mark.parametrize("name", ["blocks.0.hook_resid_mid", "blocks.1.attn.hook_pattern", "hook_pos_embed", "blocks.2.mlp.hook_pre"])
def test_a_backward_hook_sees_the_gradient_of_its_activation(model, tokens, name):
    activations, grads = [], []

    def keep(act, hook):
        act.retain_grad()  # autograd's own record of this activation's gradient
        activations.append(act)

    model.zero_grad()
    logits = model.run_with_hooks(
        tokens, fwd_hooks=[(name, keep)], bwd_hooks=[(name, lambda grad, hook: grads.append(grad.clone()))]
    )
    assert not grads, "backward hooks fire only in the backward pass"
    _loss(logits, tokens).backward()
    assert len(grads) == 1
    torch.testing.assert_close(grads[0], activations[0].grad, atol=0, rtol=0)
    assert grads[0].abs().max() > 0
    assert no_hooks_attached(model)
    model.zero_grad()


def test_a_backward_hook_can_replace_the_gradient(tokens):
    model = make_model()

    def param_grads(bwd_hooks):
        model.zero_grad()
        _loss(model.run_with_hooks(tokens, bwd_hooks=bwd_hooks), tokens).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = param_grads([])
    doubled = param_grads([("blocks.1.hook_resid_pre", lambda grad, hook: 2 * grad)])
    for name, grad in plain.items():
        if name.startswith("blocks.0."):  # everything upstream of the hook gets twice the gradient
            torch.testing.assert_close(doubled[name], 2 * grad)
        elif name.startswith(("blocks.1.", "blocks.2.", "ln_final.")):
            torch.testing.assert_close(doubled[name], grad)
    # Replacing with zeros cuts the path: only the skip around block 0 ... is also cut,
    # since resid_mid is the only route from block 0's attention to the output.
    cut = param_grads([("blocks.0.hook_resid_mid", lambda grad, hook: torch.zeros_like(grad))])
    assert (cut["blocks.0.attn.qkv.weight"] == 0).all() and (cut["pos_embed.weight"] == 0).all()
    torch.testing.assert_close(cut["blocks.0.mlp.fc_in.weight"], plain["blocks.0.mlp.fc_in.weight"])


def test_a_replaced_gradient_reaches_backward_hooks_upstream(tokens):
    # Regression: blocks.0.hook_resid_post and blocks.1.hook_resid_pre hold one tensor, and
    # its tensor hooks ran in registration order, so the upstream hook saw the gradient
    # from before the downstream hook replaced it.
    model = make_model()
    seen = {}

    def record(grad, hook):
        seen[hook.name] = grad.clone()

    def upstream_grad(bwd_hooks):
        model.zero_grad()
        hooks = bwd_hooks + [("blocks.0.hook_resid_post", record), ("blocks.0.hook_resid_mid", record)]
        _loss(model.run_with_hooks(tokens, bwd_hooks=hooks), tokens).backward()
        model.zero_grad()
        return seen["blocks.0.hook_resid_post"], seen["blocks.0.hook_resid_mid"]

    plain_post, plain_mid = upstream_grad([])
    post, mid = upstream_grad([("blocks.1.hook_resid_pre", lambda grad, hook: 2 * grad)])
    torch.testing.assert_close(post, 2 * plain_post)
    torch.testing.assert_close(mid, 2 * plain_mid)


def test_train_mode_with_dropout_is_random_and_eval_mode_is_deterministic(tokens):
    model = make_model(dropout=0.3)
    model.train()
    first, second = model(tokens), model(tokens)
    assert (first - second).abs().max() > 1e-3
    pattern_hook = [("blocks.0.attn.hook_pattern", lambda a, h: None)]  # the explicit path drops out too
    assert (model.run_with_hooks(tokens, fwd_hooks=pattern_hook) - model.run_with_hooks(tokens, fwd_hooks=pattern_hook)).abs().max() > 1e-3
    model.eval()
    torch.testing.assert_close(model(tokens), model(tokens), atol=0, rtol=0)
    expected, _ = reference_forward(model, tokens)
    torch.testing.assert_close(model(tokens), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.run_with_hooks(tokens, fwd_hooks=pattern_hook), expected, atol=1e-5, rtol=1e-5)


def test_pos_embed_can_be_edited_in_place():
    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config(n_layers=1, d_model=16, n_heads=2, n_ctx=8, d_vocab=50)).eval()
    tokens = torch.randint(0, 50, (3, 8))

    def zero_in_place(pos_embed, hook):
        pos_embed[:, 2] = 0.0

    with torch.no_grad():
        edited = model.run_with_hooks(tokens, fwd_hooks=[("hook_pos_embed", zero_in_place)])
        saved = model.pos_embed.weight[2].clone()
        model.pos_embed.weight[2] = 0.0
        by_hand = model(tokens)
        model.pos_embed.weight[2] = saved
    torch.testing.assert_close(edited, by_hand)


BAD_OUTPUTS = {
    "fewer positions (would broadcast)": ("blocks.0.attn.hook_z", lambda z, hook: z[:, -1:]),
    "fewer features (would fail inside layer norm)": ("blocks.0.hook_resid_post", lambda x, hook: x[..., :-1]),
    "a string": ("blocks.1.hook_resid_pre", lambda x, hook: "oops"),
    "a list": ("blocks.0.mlp.hook_post", lambda x, hook: x.tolist()),
    "an extra axis": ("blocks.1.attn.hook_pattern", lambda p, hook: p[None]),
}


@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
def test_a_hook_returning_anything_but_none_or_its_shape_raises_naming_the_hook(model, tokens, case):
    name, fn = BAD_OUTPUTS[case]
    shape = tuple(model.run_with_cache(tokens, names_filter=name)[1][name].shape)
    with pytest.raises(HookOutputError) as info:
        model.run_with_hooks(tokens, fwd_hooks=[(name, fn)])
    message = str(info.value)
    assert name in message and str(shape) in message and "returned" in message, message
    assert no_hooks_attached(model)


def test_a_backward_hook_returning_a_wrong_shape_raises_naming_the_hook(tokens):
    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config(n_layers=2, d_model=64, n_heads=4, n_ctx=32, d_vocab=101))
    name = "blocks.0.hook_resid_mid"
    with pytest.raises(HookOutputError, match=rf"backward hook .* on {name} returned a tensor of shape \(2, 7, 63\)"):
        with model.hooks(bwd_hooks=[(name, lambda grad, hook: grad[..., 1:])]):
            model(tokens).logsumexp(-1).sum().backward()


def test_a_hook_may_return_another_dtype_or_a_non_contiguous_tensor_of_the_right_shape(model, tokens):
    """A float64 (or transposed-and-back) replacement is cast to the activation's dtype:
    the run gives what the same values in float32 give."""
    name = "blocks.1.hook_resid_pre"
    doubled = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: (2 * x).double())])
    assert doubled.dtype == torch.float32
    expected = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: 2 * x)])
    assert torch.equal(doubled, expected)
    same = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: x.transpose(0, 1).transpose(0, 1))])
    assert torch.equal(same, model(tokens))


def test_hooks_left_attached_are_removed_by_direction_level_and_permanence(model, tokens):
    """reset_hooks_end=False leaves a context's hooks on, at that context's level, as in
    TransformerLens; remove_all_hook_fns picks them by direction, level and permanence."""
    clean = model(tokens)
    halve = lambda act, hook: act * 0.5  # noqa: E731
    with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", halve)], reset_hooks_end=False):
        with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", halve)], reset_hooks_end=False):
            pass
    model.add_perma_hook("blocks.0.hook_attn_out", halve)
    model.add_hook("blocks.0.hook_resid_mid", lambda grad, hook: grad, dir="bwd")
    levels = lambda: sorted(  # noqa: E731
        (entry.level or 0, entry.direction, entry.permanent) for hp in model.hook_points() for entry in hp.handles)
    assert levels() == [(0, "bwd", False), (0, "fwd", True), (1, "fwd", False), (2, "fwd", False)]
    model.remove_all_hook_fns(level=2)
    assert levels() == [(0, "bwd", False), (0, "fwd", True), (1, "fwd", False)]
    model.remove_all_hook_fns(direction="fwd")
    assert levels() == [(0, "bwd", False), (0, "fwd", True)]
    model.reset_hooks(including_permanent=True)
    assert levels() == [] and no_hooks_attached(model)
    assert torch.equal(model(tokens), clean)
