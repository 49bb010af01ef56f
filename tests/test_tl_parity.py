"""TransformerLens parity: the same random GPT-2 (with perturbed layer norms and biases,
so that weight processing matters) in HookedGPT2 and in TransformerLens 3.x's
HookedTransformer, unprocessed and processed; every hook, every ActivationCache method
and the usual notebook idioms must give TransformerLens's numbers.

TransformerLens's model is built independently of ours: from a Hugging Face GPT-2
(``save_hf`` round trip) through TransformerLens's own weight conversion and processing.
"""

import contextlib
import io
import warnings

import pytest
import torch

transformer_lens = pytest.importorskip("transformer_lens")

from hooked_gpt2 import GPT2Config, HookedGPT2  # noqa: E402
from tests.perturbed import perturb_biases_and_norms  # noqa: E402

PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The cat sat on the mat and the cat"]
PROCESSING = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
NO_PROCESSING = {k: False for k in PROCESSING}


def close(actual, expected, atol=1e-4):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=1e-4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Our unprocessed model and a Hugging Face directory of the same weights."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_layers=2, d_model=32, n_heads=4, n_ctx=32, d_vocab=50257)
    model = HookedGPT2(cfg).eval()
    perturb_biases_and_norms(model)
    path = model.save_hf(tmp_path_factory.mktemp("hf") / "gpt2")
    return model, path


def tl_model(path, processing: dict):
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    hf = GPT2LMHeadModel.from_pretrained(path).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head, d_mlp=4 * c.n_embd,
        n_ctx=c.n_positions, d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN", eps=c.layer_norm_epsilon,
        default_prepend_bos=True, device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer=GPT2TokenizerFast.from_pretrained(path))
        model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), **processing)
    return model.eval()


@pytest.fixture(scope="module", params=["unprocessed", "processed"])
def pair(request, base):
    ours, path = base
    if request.param == "processed":
        ours = HookedGPT2.from_hf(path, process_weights=True)
        return ours, tl_model(path, PROCESSING)
    return ours, tl_model(path, NO_PROCESSING)


@pytest.fixture(scope="module")
def runs(pair):
    ours, theirs = pair
    return ours.run_with_cache(PROMPTS), theirs.run_with_cache(PROMPTS)


# Tokens, logits, every hook.


def test_tokens_and_logits_match(pair):
    ours, theirs = pair
    assert torch.equal(ours.to_tokens(PROMPTS), theirs.to_tokens(PROMPTS))
    for kwargs in [dict(prepend_bos=False), dict(padding_side="left"), dict(prepend_bos=None)]:
        assert torch.equal(ours.to_tokens(PROMPTS, **kwargs), theirs.to_tokens(PROMPTS, **kwargs)), kwargs
    assert torch.equal(ours.to_tokens("a<|endoftext|>b"), theirs.to_tokens("a<|endoftext|>b"))
    close(ours(PROMPTS), theirs(PROMPTS))
    for return_type in ["loss", "both"]:
        for per_token in (False, True):
            a = ours(PROMPTS[0], return_type=return_type, loss_per_token=per_token)
            b = theirs(PROMPTS[0], return_type=return_type, loss_per_token=per_token)
            for x, y in zip(a, b) if return_type == "both" else [(a, b)]:
                close(x, y)
    assert ours(PROMPTS, return_type=None) is None
    close(ours(PROMPTS, stop_at_layer=1), theirs(PROMPTS, stop_at_layer=1))


def test_every_hook_matches(runs):
    (our_logits, ours), (their_logits, theirs) = runs
    close(our_logits, their_logits)
    assert list(ours) == list(theirs)  # the same names, in the same order: no hook_result
    for name in theirs:
        close(ours[name], theirs[name])


@pytest.mark.parametrize("switch, names", [
    ("set_use_attn_result", ["blocks.1.attn.hook_result"]),
    ("set_use_split_qkv_input", ["blocks.0.hook_q_input", "blocks.1.hook_k_input", "blocks.1.hook_v_input"]),
    ("set_use_attn_in", ["blocks.0.hook_attn_in"]),
    ("set_use_hook_mlp_in", ["blocks.1.hook_mlp_in"]),
])
def test_optional_hooks_match(pair, switch, names):
    ours, theirs = pair
    for model in pair:
        getattr(model, switch)(True)
    try:
        (a, ours_cache), (b, theirs_cache) = ours.run_with_cache(PROMPTS), theirs.run_with_cache(PROMPTS)
    finally:
        for model in pair:
            getattr(model, switch)(False)
    close(a, b)
    assert list(ours_cache) == list(theirs_cache)
    for name in names:
        close(ours_cache[name], theirs_cache[name])
    for name in theirs_cache:
        close(ours_cache[name], theirs_cache[name])


# ActivationCache methods.


@pytest.mark.parametrize("kwargs", [
    {}, dict(apply_ln=True), dict(layer=-1, incl_mid=True, apply_ln=True), dict(layer=1, apply_ln=True),
    dict(layer=1, mlp_input=True, apply_ln=True, pos_slice=-1), dict(pos_slice=(1, 4), apply_ln=True, return_labels=True),
])
def test_accumulated_resid(runs, kwargs):
    (_, ours), (_, theirs) = runs
    _compare(ours.accumulated_resid(**kwargs), theirs.accumulated_resid(**kwargs))


@pytest.mark.parametrize("kwargs", [
    {}, dict(apply_ln=True), dict(layer=1, mlp_input=True, apply_ln=True), dict(mode="attn", pos_slice=-1),
    dict(mode="mlp", incl_embeds=False, return_labels=True), dict(layer=1, pos_slice=[0, 2], apply_ln=True),
])
def test_decompose_resid(runs, kwargs):
    (_, ours), (_, theirs) = runs
    _compare(ours.decompose_resid(**kwargs), theirs.decompose_resid(**kwargs))


@pytest.mark.parametrize("kwargs", [
    {}, dict(incl_remainder=True, return_labels=True), dict(layer=1, apply_ln=True, pos_slice=-1),
    dict(apply_ln=True, incl_remainder=True, pos_slice=(0, 3)),
])
def test_stack_head_results(runs, kwargs):
    (_, ours), (_, theirs) = runs
    _compare(ours.stack_head_results(**kwargs), theirs.stack_head_results(**kwargs))


@pytest.mark.parametrize("kwargs", [
    dict(layer=2), dict(layer=1, incl_remainder=True, return_labels=True), dict(layer=2, apply_ln=True, pos_slice=-1),
    dict(layer=2, neuron_slice=(0, 5), return_labels=True),
])
def test_stack_neuron_results(runs, kwargs):
    (_, ours), (_, theirs) = runs
    _compare(ours.stack_neuron_results(**kwargs), theirs.stack_neuron_results(**kwargs))


@pytest.mark.parametrize("kwargs", [
    dict(return_labels=True), dict(expand_neurons=False, apply_ln=True), dict(layer=1, mlp_input=True, pos_slice=-1),
])
def test_get_full_resid_decomposition(runs, kwargs):
    (_, ours), (_, theirs) = runs
    _compare(ours.get_full_resid_decomposition(**kwargs), theirs.get_full_resid_decomposition(**kwargs))


def test_apply_ln_to_stack_stack_activation_and_compute_head_results(runs):
    (_, ours), (_, theirs) = runs
    stack = theirs.decompose_resid()
    for kwargs in [{}, dict(layer=1), dict(layer=1, mlp_input=True)]:
        close(ours.apply_ln_to_stack(stack, **kwargs), theirs.apply_ln_to_stack(stack, **kwargs))
    close(ours.apply_ln_to_stack(stack[:, :, -1], pos_slice=-1), theirs.apply_ln_to_stack(stack[:, :, -1], pos_slice=-1))
    close(ours.apply_ln_to_stack(stack, batch_slice=[1]), theirs.apply_ln_to_stack(stack, batch_slice=[1]))
    for name, sublayer in [("pattern", None), ("scale", "ln1"), ("resid_post", None)]:
        close(ours.stack_activation(name, sublayer_type=sublayer), theirs.stack_activation(name, sublayer_type=sublayer))
    ours.compute_head_results()
    theirs.compute_head_results()
    close(ours["result", 1], theirs["result", 1])
    for key in ["k1", "scale1ln1", ("q", 0), ("normalized", 1, "ln2"), "blocks.0.attn.hook_pattern", ("resid_pre", -1)]:
        close(ours[key], theirs[key])


def test_logit_attrs_in_every_form(pair, runs):
    ours_model, theirs_model = pair
    (_, ours), (_, theirs) = runs
    tokens = ours_model.to_tokens(PROMPTS)
    answers = torch.tensor([[ours_model.to_single_token(" John"), ours_model.to_single_token(" Mary")],
                            [ours_model.to_single_token(" cat"), ours_model.to_single_token(" dog")]])
    last = theirs.accumulated_resid(pos_slice=-1)  # [component batch d_model]
    full = theirs.decompose_resid()  # [component batch pos d_model]
    cases = [
        (last, dict(tokens=answers[:, 0], incorrect_tokens=answers[:, 1], pos_slice=-1)),  # the silent bug
        (last, dict(tokens=answers[:, 0], pos_slice=-1)),
        (full, dict(tokens=tokens)),
        (full, dict(tokens=" John", incorrect_tokens=" Mary")),
        (full, dict(tokens=42, incorrect_tokens=7)),
        (full, dict(tokens=torch.tensor(42))),
        (full[:, 1:], dict(tokens=tokens[1:], batch_slice=slice(1, None), has_batch_dim=False)),
        (full, dict(tokens=tokens[1:], batch_slice=[1])),
        (last[:, 0], dict(tokens=answers[0, 0], pos_slice=-1, batch_slice=0, has_batch_dim=False)),
    ]
    for stack, kwargs in cases:
        close(ours.logit_attrs(stack, **kwargs), theirs.logit_attrs(stack, **kwargs))
    with pytest.raises(ValueError, match="same shape"):
        ours.logit_attrs(last, answers[:, 0], incorrect_tokens=answers[0, 1])


def test_remove_batch_dim_keeps_the_logits_batch_axis(pair):
    ours, theirs = pair
    (a, ours_cache), (b, theirs_cache) = (m.run_with_cache(PROMPTS[0], remove_batch_dim=True) for m in pair)
    assert a.shape == b.shape == (1, *b.shape[1:])
    for name in theirs_cache:
        close(ours_cache[name], theirs_cache[name])
    close(ours_cache.accumulated_resid(apply_ln=True), theirs_cache.accumulated_resid(apply_ln=True))
    close(ours_cache.stack_head_results(apply_ln=True), theirs_cache.stack_head_results(apply_ln=True))


def _compare(ours, theirs):
    if isinstance(theirs, tuple):
        assert ours[1] == theirs[1]  # labels
        ours, theirs = ours[0], theirs[0]
    assert ours.shape == theirs.shape
    close(ours, theirs)


# Notebook idioms and TransformerLens's own tools, end to end.


def test_notebook_idioms(pair):
    """Logit lens, DLA with residual_stack_to_logit_diff, a head ablation scored with
    return_type="loss", and an induction score from return_type=None with hook.layer()."""
    results = []
    for model in pair:
        tokens = model.to_tokens(PROMPTS)
        answers = torch.tensor([[model.to_single_token(" John"), model.to_single_token(" Mary")],
                                [model.to_single_token(" cat"), model.to_single_token(" dog")]])
        logits, cache = model.run_with_cache(tokens)
        directions = model.tokens_to_residual_directions(answers)
        logit_diff_directions = directions[:, 0] - directions[:, 1]

        def residual_stack_to_logit_diff(stack, cache=cache):
            scaled = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)
            return (scaled * logit_diff_directions).sum(-1).mean(-1)

        lens = residual_stack_to_logit_diff(cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1))
        heads = residual_stack_to_logit_diff(cache.stack_head_results(layer=-1, pos_slice=-1))

        def ablate_head(z, hook, head=1):
            z[:, :, head] = 0.0
            return z

        ablated = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[("blocks.1.attn.hook_z", ablate_head)])
        scores = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
        repeated = torch.cat([tokens[:1, :1], torch.arange(100, 110)[None], torch.arange(100, 110)[None]], dim=1)

        def induction_score_hook(pattern, hook):
            stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - 10)
            scores[hook.layer()] = stripe.mean((0, -1))

        model.run_with_hooks(repeated, return_type=None, fwd_hooks=[(lambda n: n.endswith("pattern"), induction_score_hook)])
        results.append((lens, heads, ablated, scores, model.OV[1, 2].norm(), model.QK[0].AB[1]))
    for ours, theirs in zip(*results):
        close(ours, theirs)


def test_transformer_lens_tools_run_on_our_model(pair):
    from transformer_lens import evals, head_detector, patching
    from transformer_lens.utilities.exploratory_utils import test_prompt

    results = []
    for model in pair:
        clean = model.to_tokens("When Mary and John met, John gave it to")
        corrupted = model.to_tokens("When Mary and John met, Mary gave it to")
        answer = model.to_single_token(" Mary")

        def metric(logits):
            return logits[0, -1, answer]

        _, clean_cache = model.run_with_cache(clean)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patched = [
                patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric),
                patching.get_act_patch_mlp_out(model, corrupted[:, :4], _head(model, clean_cache, 4), metric),
                patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric),
                patching.get_act_patch_attn_head_v_by_pos(model, corrupted[:, :4], _head(model, clean_cache, 4), metric),
                patching.get_act_patch_attn_head_pattern_all_pos(model, corrupted, clean_cache, metric),
            ]
            detected = head_detector.detect_head(model, PROMPTS[0], "previous_token_head")
            torch.manual_seed(0)  # induction_loss draws random tokens
            induction = evals.induction_loss(model, batch_size=2, subseq_len=8, device="cpu")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            test_prompt("When Mary and John met, John gave it to", " Mary", model, print_details=True)
        results.append((*patched, detected, induction, printed.getvalue()))
    for ours, theirs in zip(*results):
        if isinstance(theirs, str):
            assert ours == theirs  # test_prompt's printed ranks and probabilities
        else:
            close(torch.as_tensor(ours), torch.as_tensor(theirs))


def _head(model, cache, n_pos):
    """The cache of a run on the first ``n_pos`` tokens (patching wants matching lengths)."""
    return model.run_with_cache(model.to_tokens("When Mary and John met, John gave it to")[:, :n_pos])[1]


def test_processing_changes_logits_by_a_constant_per_position(base):
    ours, path = base
    processed = HookedGPT2.from_hf(path, process_weights=True)
    tokens = ours.to_tokens(PROMPTS)
    with torch.no_grad():
        before, after = ours(tokens), processed(tokens)
        shift = (after - before).mean(-1, keepdim=True)
        close(after, before + shift)
        close(after.log_softmax(-1), before.log_softmax(-1))
    assert processed.cfg.normalization_type == "LNPre" and ours.cfg.normalization_type == "LN"
    with pytest.raises(ValueError, match="process again after loading"):
        processed.save_pretrained(path.parent / "nope")


def test_tokenizer_and_string_helpers_match(pair):
    ours, theirs = pair
    for tok in (ours.tokenizer, theirs.tokenizer):
        tok.padding_side = "right"
    a = ours.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    b = theirs.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours.tokenizer, name) == getattr(theirs.tokenizer, name)
    ids = ours.to_tokens(PROMPTS[0])
    assert ours.tokenizer.decode(ids[0]) == theirs.tokenizer.decode(ids[0])
    assert ours.tokenizer.batch_decode(ids) == theirs.tokenizer.batch_decode(ids)
    assert ours.tokenizer.encode("a<|endoftext|>b") == theirs.tokenizer.encode("a<|endoftext|>b")
    assert ours.to_str_tokens(PROMPTS) == theirs.to_str_tokens(PROMPTS)
    assert ours.to_str_tokens(ids) == theirs.to_str_tokens(ids)
    for single in (int(ids[0, 3]), ids[0, 3]):
        assert ours.to_string(single) == theirs.to_string(single)
    assert ours.to_string(ids) == theirs.to_string(ids)
    assert ours.get_token_position(" John", PROMPTS[0], mode="last") == theirs.get_token_position(" John", PROMPTS[0], mode="last")
    assert ours.to_single_token(" Mary") == theirs.to_single_token(" Mary")
    close(ours.tokens_to_residual_directions(" Mary"), theirs.tokens_to_residual_directions(" Mary"))
    assert ours.cfg.d_vocab_out == theirs.cfg.d_vocab_out and ours.cfg.n_key_value_heads == theirs.cfg.n_key_value_heads
    assert ours.cfg.normalization_type == theirs.cfg.normalization_type
    close(ours.b_U, theirs.b_U)
    for weight in ("W_E", "W_pos", "W_U", "W_Q", "b_K", "W_O", "b_in", "W_out"):
        close(getattr(ours, weight), getattr(theirs, weight))
    close(ours.embed.W_E, theirs.embed.W_E)
    close(ours.unembed.W_U, theirs.unembed.W_U)
    close(ours.OV.eigenvalues.abs(), theirs.OV.eigenvalues.abs())
    close(ours.QK[1, 0, :3].AB, theirs.QK[1, 0, :3].AB)
    close(ours.OV[0].svd()[1], theirs.OV[0].svd()[1])


def test_generate_and_gradients_match(pair):
    ours, theirs = pair
    kwargs = dict(max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    assert ours.generate(PROMPTS[0], **kwargs) == theirs.generate(PROMPTS[0], **kwargs)
    tokens = ours.to_tokens(PROMPTS[0])
    assert torch.equal(ours.generate(tokens, **kwargs), theirs.generate(tokens, **kwargs))
    names = lambda n: n.endswith(("hook_resid_pre", "hook_pattern"))  # noqa: E731
    a_loss, a = ours.run_with_cache(PROMPTS[0], return_type="loss", incl_bwd=True, names_filter=names)
    b_loss, b = theirs.run_with_cache(PROMPTS[0], return_type="loss", incl_bwd=True, names_filter=names)
    ours.zero_grad()
    theirs.zero_grad()
    close(a_loss, b_loss)
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for name in b:
        close(a[name], b[name])


def test_refactored_attention_matrices_match(base):
    """Refactoring replaces each head's factors by SVD-derived ones. Those are unique only
    up to the sign of each singular vector (and a rotation among equal singular values),
    so a column of q/k/v/z may come out negated relative to TransformerLens's when the
    weights differ in the last bit; everything that does not depend on that choice (the
    QK and OV matrices, scores, patterns, residual streams, logits) must match."""
    _, path = base
    flags = dict(PROCESSING, refactor_factored_attn_matrices=True)
    ours, theirs = HookedGPT2.from_hf(path, process_weights=True, **flags), tl_model(path, flags)
    (a, ours_cache), (b, theirs_cache) = ours.run_with_cache(PROMPTS), theirs.run_with_cache(PROMPTS)
    close(a, b)
    assert list(ours_cache) == list(theirs_cache)
    for name in theirs_cache:
        if not name.endswith(("hook_q", "hook_k", "hook_v", "hook_z")):
            close(ours_cache[name], theirs_cache[name])
    close(ours.QK.AB, theirs.QK.AB)
    close(ours.OV.AB, theirs.OV.AB)
    close(ours.b_O, theirs.b_O)
    assert torch.equal(ours.b_V, torch.zeros_like(ours.b_V))
    # The refactored factors have TransformerLens's structure: equal-norm Q and K
    # factors (the bias counted as a row), and W_O's rows orthonormal.
    Q = torch.cat([ours.W_Q, ours.b_Q[:, :, None]], dim=-2)
    K = torch.cat([ours.W_K, ours.b_K[:, :, None]], dim=-2)
    close(Q.norm(dim=-2), K.norm(dim=-2), atol=1e-5)
    eye = torch.eye(ours.cfg.d_head).expand(ours.cfg.n_layers, ours.cfg.n_heads, -1, -1)
    close(ours.W_O @ ours.W_O.transpose(-2, -1), eye, atol=1e-5)


def test_permanent_hooks_and_act_names_match(pair):
    from transformer_lens.utilities import get_act_name as tl_get_act_name

    from hooked_gpt2 import utils

    for name in ["k1", "scale1ln1", "normalized0ln2", "pattern1", "embed", "scale", "blocks.0.hook_resid_pre"]:
        assert utils.get_act_name(name) == tl_get_act_name(name), name
    # TransformerLens's pattern stops at "_" and makes "hook_resid_pre0", a name no model has.
    assert utils.get_act_name("resid_pre0") == "blocks.0.hook_resid_pre"
    for args in [("q", 0), ("z", 1, "a"), ("post", 1), ("scale", 0, "ln1"), ("resid_post", 1)]:
        assert utils.get_act_name(*args) == tl_get_act_name(*args), args
    tokens = pair[0].to_tokens(PROMPTS)
    results = []
    for model in pair:
        seen = []

        def double_head_0(z, hook):
            hook.ctx["calls"] = hook.ctx.get("calls", 0) + 1
            seen.append(hook.layer())
            z[:, :, 0] = 2 * z[:, :, 0]
            return z

        model.add_hook("blocks.1.attn.hook_z", double_head_0, is_permanent=True)
        model.add_hook(lambda n: n.endswith("hook_mlp_out"), lambda act, hook: act * 0.5, dir="fwd")
        both = model(tokens)
        model.reset_hooks()  # the permanent one stays
        permanent = model(tokens)
        calls = model.hook_dict["blocks.1.attn.hook_z"].ctx.get("calls")
        model.reset_hooks(including_permanent=True)
        results.append((both, permanent, model(tokens), torch.tensor(seen), torch.tensor(calls or 0)))
    for ours, theirs in zip(*results):
        close(ours, theirs)


# Architecture variants: RMSNorm, rotary positions and SwiGLU (a Llama-style model).


def tl_variant(model, processing: dict):
    """TransformerLens's HookedTransformer with ``model``'s weights, read through
    TransformerLens's own names (W_Q [head d_model d_head] etc., as ours are)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    c = model.cfg
    cfg = HookedTransformerConfig(
        n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads, d_head=c.d_head, d_mlp=c.d_mlp, n_ctx=c.n_ctx,
        d_vocab=c.d_vocab, act_fn="silu", gated_mlp=True, normalization_type="RMS", final_rms=True,
        positional_embedding_type="rotary", rotary_dim=c.rotary_dim, rotary_base=c.rotary_base,
        rotary_adjacent_pairs=False, eps=c.layer_norm_eps, device="cpu",
    )
    state = {"embed.W_E": model.W_E, "ln_final.w": model.ln_final.w, "unembed.W_U": model.W_U, "unembed.b_U": model.b_U}
    for l, block in enumerate(model.blocks):
        state[f"blocks.{l}.ln1.w"], state[f"blocks.{l}.ln2.w"] = block.ln1.w, block.ln2.w
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            state[f"blocks.{l}.attn.{name}"] = getattr(block.attn, name)
        for name in ("W_in", "W_gate", "W_out", "b_in", "b_out"):
            state[f"blocks.{l}.mlp.{name}"] = getattr(block.mlp, name)
    state = {k: v.detach().clone() for k, v in state.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = HookedTransformer(cfg)
        theirs.load_and_process_state_dict(state, **processing)
    return theirs.eval()


@pytest.mark.parametrize("processing", [NO_PROCESSING, PROCESSING], ids=["unprocessed", "processed"])
def test_llama_style_model_and_its_processing_match(processing):
    """RMSNorm's weight folds into the readers (RMSNormPre, no centring), writers are not
    centred (TransformerLens skips that for RMS models) and there is no W_pos to centre."""
    from tests.reference_variants import make_variant

    ours = make_variant("llama", d_vocab=300, n_ctx=32)
    theirs = tl_variant(ours, processing)
    if processing["fold_ln"]:
        ours.process_weights_()
        assert ours.cfg.normalization_type == theirs.cfg.normalization_type == "RMSPre"
    tokens = torch.tensor([[1, 5, 17, 3, 99, 42, 42, 8, 250, 63], [2, 2, 7, 11, 13, 17, 19, 23, 29, 31]])
    (our_logits, our_cache), (their_logits, their_cache) = ours.run_with_cache(tokens), theirs.run_with_cache(tokens)
    close(our_logits, their_logits)
    shared = [name for name in their_cache if name in our_cache.cache_dict]
    for name in ("blocks.1.attn.hook_rot_q", "blocks.0.mlp.hook_pre_linear", "blocks.1.ln2.hook_normalized",
                 "ln_final.hook_scale", "blocks.0.attn.hook_z"):
        assert name in shared
    for name in shared:
        close(our_cache[name], their_cache[name])
    for method, kwargs in [("accumulated_resid", dict(apply_ln=True)), ("decompose_resid", dict(apply_ln=True)),
                           ("stack_head_results", dict(apply_ln=True))]:
        ours_stack = getattr(our_cache, method)(**kwargs)
        close(ours_stack, getattr(their_cache, method)(**kwargs))
    close(ours.W_U, theirs.W_U)
    close(ours.blocks[0].mlp.W_gate, theirs.blocks[0].mlp.W_gate)


def test_processing_refuses_what_it_cannot_do_on_variants():
    from tests.reference_variants import make_variant

    for name in ("rotary", "qk_norm"):
        with pytest.raises(ValueError, match="refactor_factored_attn_matrices is not supported"):
            make_variant(name).process_weights_(refactor_factored_attn_matrices=True)
        model = make_variant(name)
        for call in (model.refactor_factored_attn_matrices, lambda: model.refactor_factored_attn_matrices(model.state_dict())):
            with pytest.raises(ValueError, match="refactor_factored_attn_matrices is not supported"):
                call()
    with pytest.raises(ValueError, match="center_weights=False"):
        make_variant("rmsnorm").fold_layer_norm()
    with pytest.raises(ValueError, match="RMSNorm does not"):
        make_variant("rmsnorm").center_writing_weights()
    from hooked_gpt2 import processing

    with pytest.raises(ValueError, match="RMSNorm does not"):
        processing.center_writing_weights(make_variant("rmsnorm"))


# The rest of TransformerLens's calls, at two shapes (d_model / n_heads), processed and
# unprocessed, with our model loaded from an in-memory Hugging Face model and from a directory.

SHAPES = {"d32h4": dict(n_layers=2, d_model=32, n_heads=4), "d48h3": dict(n_layers=3, d_model=48, n_heads=3)}


@pytest.fixture(scope="module", params=list(SHAPES))
def shaped_base(request, tmp_path_factory):
    """A Hugging Face directory of a random GPT-2 of this shape (perturbed layer norms and biases)."""
    torch.manual_seed(1)
    model = HookedGPT2(GPT2Config(**SHAPES[request.param], n_ctx=32, d_vocab=50257)).eval()
    perturb_biases_and_norms(model)
    return model.save_hf(tmp_path_factory.mktemp(request.param) / "gpt2")


@pytest.fixture(scope="module", params=["object-unprocessed", "object-processed", "dir-unprocessed", "dir-processed"])
def loaded_pair(request, shaped_base):
    from transformers import GPT2LMHeadModel

    source, processing = request.param.split("-")
    processed = processing == "processed"
    hf_or_dir = GPT2LMHeadModel.from_pretrained(shaped_base).eval() if source == "object" else shaped_base
    ours = HookedGPT2.from_hf(hf_or_dir, process_weights=processed)
    return ours, tl_model(shaped_base, PROCESSING if processed else NO_PROCESSING)


def tl_layout(state: dict, n_heads: int) -> dict:
    """Our state dict under TransformerLens's names and axes (W_Q [head d_model d_head], ...),
    written out here, independently of the model's own views."""
    out = {}
    for name, t in state.items():
        prefix, _, leaf = name.rpartition(".")
        if name.endswith("attn.qkv.weight"):
            W = t.reshape(3, n_heads, -1, t.shape[-1]).transpose(-2, -1)  # [3 head d_model d_head]
            out.update({f"{prefix[:-4]}.W_Q": W[0], f"{prefix[:-4]}.W_K": W[1], f"{prefix[:-4]}.W_V": W[2]})
        elif name.endswith("attn.qkv.bias"):
            b = t.reshape(3, n_heads, -1)
            out.update({f"{prefix[:-4]}.b_Q": b[0], f"{prefix[:-4]}.b_K": b[1], f"{prefix[:-4]}.b_V": b[2]})
        elif name.endswith("attn.out.weight"):
            out[f"{prefix[:-4]}.W_O"] = t.reshape(t.shape[0], n_heads, -1).permute(1, 2, 0)
        elif name.endswith("attn.out.bias"):
            out[f"{prefix[:-4]}.b_O"] = t
        elif ".mlp.fc_" in name:
            which = "in" if ".fc_in." in name else "out"
            out[f"{prefix[: -len('.fc_' + which)]}.{'W' if leaf == 'weight' else 'b'}_{which}"] = (
                t.T if leaf == "weight" else t)
        elif name in ("embed.weight", "pos_embed.weight"):
            out["embed.W_E" if name == "embed.weight" else "pos_embed.W_pos"] = t
        elif name == "unembed.weight":
            out["unembed.W_U"] = t.T
        elif name == "unembed.bias":
            out["unembed.b_U"] = t
        elif ".ln" in name or name.startswith("ln_final"):
            out[f"{prefix}.{'w' if leaf == 'weight' else 'b'}"] = t
    return out


def assert_same_weights(ours: dict, theirs: dict, n_heads: int, skip=()) -> None:
    """Every weight of TransformerLens's state dict matches ours; where we have none (the
    scale-only norms of a folded model, biases we never had), theirs is the identity."""
    ours = tl_layout(ours, n_heads)
    for name, t in theirs.items():
        if not t.is_floating_point() or name.endswith(("IGNORE", "mask")) or name.endswith(skip):
            continue
        if name in ours:
            close(ours[name], t, atol=2e-5)
        else:
            assert torch.equal(t, torch.ones_like(t) if name.endswith(".w") else torch.zeros_like(t)), name


STEP_NAMES = ["fold_layer_norm", "center_writing_weights", "center_unembed", "fold_value_biases"]


@pytest.mark.parametrize("step", STEP_NAMES)
def test_processing_step_methods_match(loaded_pair, step):
    """Each step on a state dict returns TransformerLens's processed copy, leaving the
    input as it was; without a state dict it processes the model in place to the same weights."""
    import copy

    ours, theirs = loaded_pair
    n_heads = ours.cfg.n_heads
    our_state, their_state = ours.state_dict(), theirs.state_dict()
    before = {name: t.clone() for name, t in our_state.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = getattr(theirs, step)(their_state)
    assert_same_weights(getattr(ours, step)(our_state), expected, n_heads)
    assert all(torch.equal(t, before[name]) for name, t in our_state.items())
    in_place = copy.deepcopy(ours)
    assert getattr(in_place, step)() is in_place
    assert_same_weights(in_place.state_dict(), expected, n_heads)


def test_processing_step_methods_chain_as_from_pretrained_does(loaded_pair):
    ours, theirs = loaded_pair
    our_state, their_state = ours.state_dict(), theirs.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in STEP_NAMES:
            our_state, their_state = getattr(ours, step)(our_state), getattr(theirs, step)(their_state)
            assert_same_weights(our_state, their_state, ours.cfg.n_heads)
        ours_refactored = ours.refactor_factored_attn_matrices(our_state)
        theirs_refactored = theirs.refactor_factored_attn_matrices(their_state)
    # SVD factors are unique up to sign: compare what they multiply to, and the biases.
    a, b = tl_layout(ours_refactored, ours.cfg.n_heads), theirs_refactored
    for l in range(ours.cfg.n_layers):
        p = f"blocks.{l}.attn."
        close(a[p + "W_Q"] @ a[p + "W_K"].transpose(-2, -1), b[p + "W_Q"] @ b[p + "W_K"].transpose(-2, -1))
        close(a[p + "W_V"] @ a[p + "W_O"], b[p + "W_V"] @ b[p + "W_O"])
        close(a[p + "b_O"], b[p + "b_O"])
    with pytest.raises(ValueError, match="TransformerLens's layout"):
        ours.fold_layer_norm(theirs.state_dict())
    with pytest.raises(ValueError, match="fold_biases=False"):
        ours.fold_layer_norm(fold_biases=False)


def test_weights_circuits_and_composition_scores_match(loaded_pair):
    ours, theirs = loaded_pair
    close(ours.W_E_pos, theirs.W_E_pos)
    for l in range(ours.cfg.n_layers):
        for circuit in ("OV", "QK"):
            a, b = getattr(ours.blocks[l].attn, circuit), getattr(theirs.blocks[l].attn, circuit)
            assert a.shape == b.shape
            close(a.AB, b.AB)
            close(a.norm(), b.norm())
    for mode in "QKV":
        close(ours.all_composition_scores(mode), theirs.all_composition_scores(mode), atol=1e-5)
    with pytest.raises(ValueError, match="mode must be"):
        ours.all_composition_scores("O")


def test_cache_batch_slices_autodiff_and_logit_attrs_match(loaded_pair):
    ours, theirs = loaded_pair
    tokens = ours.to_tokens(PROMPTS)
    (_, a), (_, b) = ours.run_with_cache(tokens), theirs.run_with_cache(tokens)
    for batch_slice in (1, [1], (0, 1), slice(1, 2)):
        sliced_a, sliced_b = a.apply_slice_to_batch_dim(batch_slice), b.apply_slice_to_batch_dim(batch_slice)
        assert sliced_a.has_batch_dim == sliced_b.has_batch_dim and list(sliced_a) == list(sliced_b)
        for name in sliced_b:
            close(sliced_a[name], sliced_b[name])
        if sliced_b.has_batch_dim:
            close(sliced_a.accumulated_resid(apply_ln=True), sliced_b.accumulated_resid(apply_ln=True))
    wrong = tokens.flip(0)  # [batch pos] ids, as the docstring's layout
    for method in ("accumulated_resid", "decompose_resid", "stack_head_results", "get_full_resid_decomposition"):
        stack_a, stack_b = getattr(a, method)(), getattr(b, method)()
        close(a.logit_attrs(stack_a, tokens), b.logit_attrs(stack_b, tokens))
        close(a.logit_attrs(stack_a, tokens, incorrect_tokens=wrong), b.logit_attrs(stack_b, tokens, incorrect_tokens=wrong))
    try:
        for cache in (a, b):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache.toggle_autodiff(False)
                assert not torch.is_grad_enabled()
                cache.toggle_autodiff(True)
                assert torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)


def test_run_with_cache_grad_pos_slice_and_reset_hooks_end_match(loaded_pair):
    ours, theirs = loaded_pair
    tokens, other = ours.to_tokens(PROMPTS[0]), ours.to_tokens(PROMPTS[0][::-1])[:, :14]
    tokens = tokens[:, :14]
    grads = []
    for model in (ours, theirs):
        model.zero_grad()
        logits, cache = model.run_with_cache(tokens)
        assert logits.grad_fn is not None and not any(t.requires_grad for t in cache.values())
        logits[0, -1, 42].backward()  # attribution patching's metric(logits).backward()
        grads.append(model.pos_embed.W_pos.grad.clone())  # not W_E: an unprocessed GPT-2 ties it to W_U
        model.zero_grad()
    close(*grads)
    for pos_slice in (-1, (1, 4), [0, 2, 5]):
        (_, a), (_, b) = ours.run_with_cache(tokens, pos_slice=pos_slice), theirs.run_with_cache(tokens, pos_slice=pos_slice)
        assert list(a) == list(b)
        for name in b:
            close(a[name], b[name])
    caches = []
    for model in (ours, theirs):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre", reset_hooks_end=False)
        model(other)  # the hooks are still attached: they store this run
        model.reset_hooks()
        model(tokens)
        caches.append(cache["blocks.0.hook_resid_pre"])
    close(*caches)
    close(caches[0], ours.run_with_cache(other)[1]["blocks.0.hook_resid_pre"])


def test_caching_hooks_and_hook_removal_match(loaded_pair):
    ours, theirs = loaded_pair
    tokens = ours.to_tokens(PROMPTS[1])
    results = []
    for model in (ours, theirs):
        store, fwd, bwd = model.get_caching_hooks(lambda n: "resid" in n or "pattern" in n, incl_bwd=True)
        with model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
            model(tokens, return_type="loss").backward()
        model.zero_grad()
        every = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.cache_all(every)
        model(tokens)
        model.reset_hooks()
        halve = lambda act, hook: act * 0.5  # noqa: E731
        model.add_perma_hook("blocks.0.hook_mlp_out", halve)
        model.add_hook("blocks.1.hook_attn_out", halve)
        model.add_hook("blocks.0.hook_resid_mid", lambda grad, hook: 3 * grad, dir="bwd")
        both = model(tokens)
        model.remove_all_hook_fns(direction="fwd")  # the permanent one and the backward one stay
        point = model.hook_dict["blocks.0.hook_resid_mid"]
        assert len(point.handles if model is ours else point.bwd_hooks) == 1
        permanent = model(tokens)
        model.remove_all_hook_fns(including_permanent=True)
        clean = model(tokens)
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_attn_out", halve)], reset_hooks_end=False)
        still_hooked = model(tokens)
        model.reset_hooks()
        results.append((store, every, both, permanent, clean, still_hooked, model(tokens)))
    (store_a, every_a, *outs_a), (store_b, every_b, *outs_b) = results
    assert sorted(store_a) == sorted(store_b) and sorted(every_a) == sorted(every_b)
    for name in store_b:
        close(store_a[name], store_b[name])
    for name in every_b:
        close(every_a[name], every_b[name])
    for a, b in zip(outs_a, outs_b):
        close(a, b)
    assert not torch.allclose(outs_a[-2], outs_a[-1])  # reset_hooks_end=False left the hook on
