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
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from data_prep.compact import choose_vocab  # noqa: E402
from data_prep.sources import SourceStats, resolve_source  # noqa: E402
from hooked_gpt2 import GPT2Config, HookedGPT2  # noqa: E402
from hooked_gpt2 import hf_custom, hf_interop  # noqa: E402
from hooked_gpt2.config import ConfigError  # noqa: E402
from hooked_gpt2.tokenizer import D_VOCAB, CompactTokenizer, get_tokenizer  # noqa: E402
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
        dropout=0.1 if i % 5 == 3 else 0.0,  # only Trainer's steps see it: the rest runs in eval mode
    ))
# Llama's exact shape (no biases, untied): the one combination that exports as LlamaForCausalLM.
VARIANTS.append(dict(positional="rotary", norm="rmsnorm", mlp="swiglu", qkv_bias=False, attn_bias=False,
                     mlp_bias=False, tie_embeddings=False))


def variant_id(v: dict) -> str:
    mlp = "attn-only" if v.get("attn_only") else v["mlp"]
    flags = [k for k in ("qk_norm", "qkv_bias", "attn_bias", "mlp_bias", "tie_embeddings", "dropout") if v.get(k)]
    return "-".join([v["positional"], v["norm"], mlp, *flags] + (["rot8"] if v.get("rotary_dim") else []))


def random_model(vocab: list[int] | None, seed: int = 0, **variant) -> HookedGPT2:
    """A tiny model over compact vocabulary ``vocab`` (None: GPT-2's) with every parameter
    random, norms and biases included, so that a misplaced or transposed tensor cannot hide
    behind a one or a zero."""
    torch.manual_seed(seed)
    d_vocab = D_VOCAB if vocab is None else len(vocab)
    cfg = GPT2Config(**{"n_layers": 2, "d_model": 32, "n_heads": 2, "n_ctx": 32, "d_mlp": 48, "d_vocab": d_vocab,
                        "vocab": vocab, "dropout": 0.0, **variant})
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

    for back in (HookedGPT2.from_hf(path), HookedGPT2.from_hf(hf)):  # the directory, and transformers' model
        assert back.cfg == cfg
        with torch.no_grad():
            assert torch.equal(back(tokens), ours)

    losses = train_three_steps(hf, tokens, trainer_dir)
    assert len(losses) == 3 and losses[2] < losses[0], losses
    if hf.config.model_type == hf_custom.MODEL_TYPE:  # fine-tuned in transformers, back into hooked-gpt2
        # (Only our code's parameters are exactly ours: a native export's zero stand-ins for
        # absent biases train away from zero, and from_hf drops them.)
        hf.eval().save_pretrained(trainer_dir / "tuned")
        tuned = HookedGPT2.from_hf(trainer_dir / "tuned")
        with torch.no_grad():
            assert (tuned(tokens) - hf(tokens).logits).abs().max() < 1e-5


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


def test_a_fresh_model_from_the_exported_config_is_initialised_as_ours(tmp_path):
    torch.manual_seed(0)
    ours = HookedGPT2(GPT2Config(n_layers=4, d_model=128, n_heads=4, n_ctx=16, d_vocab=500, positional="rotary",
                                 qk_norm=True))
    config = transformers.AutoConfig.from_pretrained(ours.save_hf(tmp_path), trust_remote_code=True)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (500, 128, 4)
    fresh = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    assert fresh.unembed.weight is fresh.embed.weight  # tied, as config.tie_embeddings says
    state, expected = fresh.state_dict(), ours.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in state.items():  # GPT-2's initialisation: same constants, same spreads
        if expected[name].std() == 0:
            assert torch.equal(tensor, expected[name]), name
        else:
            assert abs(tensor.std() / expected[name].std() - 1) < 0.1, name


def test_save_hf_refuses_a_class_that_does_not_fit(shakespeare_vocab, tmp_path):
    model = random_model(shakespeare_vocab, positional="rotary", qk_norm=True)
    with pytest.raises(ConfigError, match="cannot be exported exactly as GPT2LMHeadModel; it exports as "
                                          "HookedGPT2ForCausalLM"):
        hf_interop.save_hf(model, tmp_path, architecture="GPT2LMHeadModel")
    assert not any(tmp_path.iterdir())


def stdlib_sample(every: int = 16) -> list[str]:
    """Every ``every``-th file of the embedded corpus (the Python standard library), about
    750 kB: the whole corpus through the HF tokenizer would take ~15 s."""
    source, stats = resolve_source("python-stdlib"), SourceStats()
    return [doc.read(stats) for i, doc in enumerate(source.documents) if i % every == 0]


def test_compact_tokenizer_matches_ours_on_the_embedded_corpus(tmp_path):
    docs = stdlib_sample()
    corpus = "<|endoftext|>".join(docs)  # as prepared data separates documents
    tricky = "héllo ünïcödé 日本語 🙂 <|other|> <|endoftext|>x\r\n\t  trailing   "
    for size, name in [(512, "frequent"), (None, "complete")]:
        # frequent: the catch-all stands for many tokens; complete: every token of the text has its own id.
        vocab = compact_vocab(corpus + tricky, size or D_VOCAB)  # complete: every GPT-2 id that occurs, + catch-all
        model = random_model(vocab)
        path = model.save_hf(tmp_path / name)
        theirs = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        ours = CompactTokenizer(vocab)
        assert theirs.eos_token_id == theirs.bos_token_id == theirs.pad_token_id == ours.eos_token_id
        assert len(theirs) == len(vocab)
        for text in [*docs, tricky, corpus[:20_000]]:
            ids = theirs(text)["input_ids"]
            assert ids == ours.encode_text(text)
            assert theirs.decode(ids) == ours.decode(ids)
            assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True)
            if size is None:
                assert theirs.decode(ids) == text  # text -> ids -> text, exactly
        other = vocab.index(-1)
        ids = theirs(tricky)["input_ids"]
        assert (other in ids) == (size is not None) and theirs.decode([other]) == "<|other|>"
        again = tmp_path / f"{name}-saved"
        theirs.save_pretrained(again)  # a tokenizer saved by transformers loads the same
        reloaded = transformers.AutoTokenizer.from_pretrained(again, trust_remote_code=True)
        assert reloaded(docs[0])["input_ids"] == ours.encode_text(docs[0])
    with pytest.raises(ValueError, match="outside this compact vocabulary of"):
        theirs.decode([len(vocab)])


# Run in a fresh interpreter, from a directory outside the repository, with hooked_gpt2
# (and the repository's other packages) made unimportable: the exports must stand alone.
STANDALONE = textwrap.dedent('''
    import importlib.abc, json, sys
    REPO_PACKAGES = ("hooked_gpt2", "data_prep", "training", "analyses", "tests")

    class Refuse(importlib.abc.MetaPathFinder):  # ahead of the editable install's finder
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in REPO_PACKAGES:
                raise ImportError(f"{name} is not importable in this test")

    sys.meta_path.insert(0, Refuse())
    sys.path = [p for p in sys.path if not p.startswith(sys.argv[2])]
    try:
        import hooked_gpt2  # noqa: F401
        sys.exit("hooked_gpt2 is importable")
    except ImportError:
        pass
    import torch, transformers

    results = {}
    tensors = torch.load(sys.argv[1] + ".pt", weights_only=True)
    for name, case in json.loads(open(sys.argv[1]).read()).items():
        path, tokens = case["path"], tensors[name + ".tokens"]
        model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(tokens).logits
        prompt = tokens[:, :4]
        greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
        generator = transformers.pipeline("text-generation", model=path, trust_remote_code=True, device="cpu")
        text = generator(case["prompt"], max_new_tokens=8, do_sample=False, return_full_text=False)[0]
        args = transformers.TrainingArguments(output_dir=case["trainer_dir"], max_steps=3, learning_rate=1e-2,
                                              per_device_train_batch_size=len(tokens), logging_steps=1,
                                              save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
        data = [{"input_ids": row, "labels": row} for row in tokens]
        trainer = transformers.Trainer(model=model.train(), args=args, train_dataset=data)
        trainer.train()
        results[name] = {
            "class": type(model).__name__, "module": type(model).__module__,
            "max_diff": (logits - tensors[name + ".logits"]).abs().max().item(),
            "greedy": greedy.tolist(), "text": text["generated_text"],
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        }
    print(json.dumps(results))
''')


def train_run(shakespeare_data, out, preset: str, **model) -> HookedGPT2:
    """The final checkpoint of a few steps of training.train, loaded as a user would."""
    from training import rundir
    from training.config import TrainConfig
    from training.train import train

    cfg = TrainConfig(preset=preset, model=dict(dropout=0.0, **model), data=str(shakespeare_data), out=str(out),
                      batch_size=2, max_steps=3, warmup_steps=1, eval_every=3, eval_batches=1, eval_batch_size=2,
                      sample_tokens=0, precision="fp32", progress=False, tensorboard=False, peak_flops=1e12, seed=0)
    _, checkpoint = rundir.list_checkpoints(train(cfg))[-1]
    return HookedGPT2.from_pretrained(checkpoint)


def test_exports_run_where_hooked_gpt2_cannot_be_imported(shakespeare_data, tmp_path):
    from data_prep.compact import compact

    compacted = compact(shakespeare_data, tmp_path / "v128", 128, log=lambda *a: None)
    models = {
        "demo": train_run(shakespeare_data, tmp_path / "runs" / "demo", "demo"),  # the main job's preset
        "qk_norm": random_model(None, qk_norm=True),  # GPT-2's vocabulary: its own tokenizer, no remote code for it
        "compact": train_run(compacted, tmp_path / "runs" / "compact", "demo"),  # as the studies train it
    }
    assert models["compact"].cfg.vocab is not None and models["demo"].cfg.attn_only
    cases, tensors, expected = {}, {}, {}
    for name, model in models.items():
        path = model.save_hf(tmp_path / "exports" / name)
        assert (path / "modeling_hooked_gpt2.py").is_file()
        tokens = random_tokens(model.cfg.d_vocab, 2, model.cfg.n_ctx, seed=1)
        with torch.no_grad():
            logits = model(tokens)
        prompt = model.to_tokens(PROMPT, prepend_bos=False)
        continuation = model.generate(prompt, max_new_tokens=8, temperature=0)[0, prompt.shape[1]:]
        cases[name] = {"path": str(path), "prompt": PROMPT, "trainer_dir": str(tmp_path / "trainer" / name)}
        tensors[name + ".tokens"], tensors[name + ".logits"] = tokens, logits
        expected[name] = {"greedy": model.generate(tokens[:, :4], max_new_tokens=12, temperature=0).tolist(),
                          "text": model.tokenizer.decode(continuation, skip_special_tokens=True)}
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    torch.save(tensors, tmp_path / "cases.json.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    repo = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-I", "-c", STANDALONE, str(tmp_path / "cases.json"), repo],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        assert result["class"] == CUSTOM and result["module"].startswith("transformers_modules."), result
        assert result["max_diff"] < 1e-5, (name, result["max_diff"])
        assert result["greedy"] == expected[name]["greedy"], name
        assert result["text"] == expected[name]["text"], name
        assert len(result["losses"]) == 3 and result["losses"][2] < result["losses"][0], (name, result["losses"])
