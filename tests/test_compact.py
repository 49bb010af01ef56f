"""A compact vocabulary (data_prep.compact): the rewritten data against an independent
count of the source, the tokenizer and the model's text I/O over it, a training run on it,
and the clear errors where data and model disagree."""

import collections
import json

import numpy as np
import pytest
import torch

from analyses import cli
from analyses.common import AnalysisError, bos_token, check_data_vocab
from analyses.evaluate import main as evaluate_main
from analyses.heads import repeated_random_tokens
from data_prep.compact import compact, main as compact_main
from data_prep.reader import TokenDataset
from data_prep.repeats import frequent_tokens
from data_prep.sources import DataPrepError
from hooked_gpt2 import ConfigError, GPT2Config, HookedGPT2
from hooked_gpt2.tokenizer import EOT_TOKEN, OTHER, OTHER_TEXT, CompactTokenizer, GPT2Tokenizer, get_tokenizer
from training.config import TrainConfig
from training.study import resolve_study, run_study
from training.train import train

SIZE = 64


@pytest.fixture(scope="module")
def compacted(shakespeare_data, tmp_path_factory):
    return compact(shakespeare_data, tmp_path_factory.mktemp("compact") / "v64", SIZE, log=lambda *a: None)


def test_ids_are_ranks_of_the_training_counts_and_every_other_token_is_one_id(shakespeare_data, compacted):
    source = {s: TokenDataset(shakespeare_data, s) for s in ("train", "val")}
    counts = collections.Counter(source["train"].read(0, len(source["train"])).tolist())
    expected = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][: SIZE - 1]
    if EOT_TOKEN not in expected:
        expected = expected[:-1] + [EOT_TOKEN]
    manifest = json.loads((compacted / "manifest.json").read_text())
    assert manifest["vocab"]["ids"] == expected + [OTHER]
    for split, dataset in source.items():
        original = dataset.read(0, len(dataset))
        rewritten = TokenDataset(compacted, split).read(0, len(dataset))
        rank = {t: i for i, t in enumerate(expected)}
        assert rewritten.tolist() == [rank.get(t, SIZE - 1) for t in original.tolist()]
        assert manifest["vocab"]["other_fraction"][split] == pytest.approx(np.mean(rewritten == SIZE - 1))
    # The split layout and documents are the source's; only ids (and shard hashes) change.
    assert TokenDataset(compacted, "train").vocab == expected + [OTHER]
    TokenDataset(compacted, "train", verify_sha256=True)


def test_rerun_does_nothing_and_bad_requests_are_clear_errors(shakespeare_data, compacted, tmp_path, capsys):
    before = (compacted / "train_000000.bin").stat().st_mtime_ns
    compact(shakespeare_data, compacted, SIZE, log=lambda *a: None)
    assert (compacted / "train_000000.bin").stat().st_mtime_ns == before
    with pytest.raises(DataPrepError, match="other prepared data.*--force"):
        compact(shakespeare_data, compacted, SIZE * 2)
    with pytest.raises(DataPrepError, match="already has a compact vocabulary"):
        compact(compacted, tmp_path / "again", 32)
    with pytest.raises(DataPrepError, match="the source itself"):
        compact(shakespeare_data, shakespeare_data, 32)
    assert compact_main([str(shakespeare_data), "--vocab-size", "3", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--vocab-size must be an integer in [16, 50257]" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_tokenizer_maps_through_the_vocabulary_and_names_every_other_token():
    gpt2 = get_tokenizer()
    hello, world, comma = gpt2.encode_ordinary("Hello"), gpt2.encode_ordinary(" world"), gpt2.encode_ordinary(",")
    tok = CompactTokenizer([*hello, EOT_TOKEN, *world, OTHER])
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == 1 and len(tok) == 4
    assert tok.encode("Hello world,Hello") == [1, 0, 2, 3, 0]
    assert tok.encode_ordinary("Hello,") == [0, 3] and comma[0] not in tok.vocab
    assert tok.decode([1, 0, 2, 3, 0]) == "<|endoftext|>Hello world" + OTHER_TEXT + "Hello"
    assert tok.decode([1, 0, 2], skip_special_tokens=True) == "Hello world"
    batch = tok(["Hello", "Hello world"], return_tensors="pt", padding=True)
    assert batch["input_ids"].tolist() == [[1, 0, 1], [1, 0, 2]]
    with pytest.raises(AttributeError, match="not tiktoken's 'encode_batch'"):
        tok.encode_batch(["a"])
    with pytest.raises(ValueError, match="outside this compact vocabulary of 4"):
        tok.decode([4])
    for bad, message in (([1, 2, 3], "exactly one -1"), ([EOT_TOKEN, EOT_TOKEN, OTHER], "each GPT-2 id once"),
                         ([EOT_TOKEN, 60000, OTHER], r"\[0, 50257\)")):
        with pytest.raises(ValueError, match=message):
            CompactTokenizer(bad)
    assert GPT2Tokenizer().encode("Hello") == [EOT_TOKEN, *hello]  # GPT-2's own, unchanged


def test_model_reads_and_writes_text_in_its_vocabulary(compacted, tmp_path):
    vocab = TokenDataset(compacted, "train").vocab
    cfg = GPT2Config.preset("demo", d_vocab=SIZE, vocab=vocab)
    model = HookedGPT2(cfg).eval()
    tokens = model.to_tokens("the king")
    assert tokens[0, 0] == vocab.index(EOT_TOKEN) == bos_token(model)
    assert int(tokens.max()) < SIZE
    assert tokens[0, 1:].tolist() == model.tokenizer.encode_text("the king")
    assert model.to_string(tokens[0, 1:]) == "".join(
        get_tokenizer().decode([t]) if t in vocab else OTHER_TEXT for t in get_tokenizer().encode_ordinary("the king"))
    assert SIZE - 1 not in model.tokenizer.encode_text(" the")
    text = model.generate(" the", max_new_tokens=5, seed=0, verbose=False)
    assert isinstance(text, str) and text.startswith(" the") and len(text) > len(" the")
    probe = repeated_random_tokens(model, seq_len=5, batch=2)
    assert (probe[:, 0] == model.tokenizer.bos_token_id).all() and int(probe.max()) < SIZE
    again = HookedGPT2.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    assert again.cfg.vocab == vocab and torch.equal(again.to_tokens("the king"), tokens)
    assert HookedGPT2.from_hf(model.save_hf(tmp_path / "hf")).cfg.vocab == vocab  # tests/test_hf_custom.py: the rest
    with pytest.raises(ConfigError, match="vocab lists 64 tokens but d_vocab is 65"):
        GPT2Config.preset("demo", d_vocab=SIZE + 1, vocab=vocab)


def test_training_on_compact_data_takes_the_vocabulary_from_the_data(compacted, shakespeare_data, tmp_path):
    cfg = TrainConfig(data=str(compacted), out=str(tmp_path / "run"), batch_size=4, max_steps=4, eval_every=2,
                      eval_batches=1, eval_batch_size=2, ckpt_every=2, sample_tokens=4, sample_every=2,
                      precision="fp32", progress=False, tensorboard=False, sample_prompts=[" the"])
    run = train(cfg)
    saved = json.loads((run / "config.json").read_text())
    vocab = TokenDataset(compacted, "train").vocab
    assert saved["model"]["d_vocab"] == SIZE and saved["model"]["vocab"] == vocab
    model = HookedGPT2.from_pretrained(run / "checkpoints" / "step_0000004")
    assert model.cfg.d_vocab == SIZE and model.W_U.shape[-1] == SIZE and model.cfg.vocab == vocab
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(s["prompt"] == " the" and s["text"] for s in samples)
    # The repeated spans and probes draw from real tokens, never the catch-all id.
    assert SIZE - 1 not in frequent_tokens(TokenDataset(compacted, "train"), SIZE).tolist()
    assert len(frequent_tokens(TokenDataset(compacted, "train"), SIZE)) == SIZE - 1
    with pytest.raises(ConfigError, match="fixes the model's d_vocab"):
        train(TrainConfig.from_dict({**cfg.to_dict(), "out": str(tmp_path / "r2"), "model": {"d_vocab": 100}}))
    with pytest.raises(ConfigError, match="holds GPT-2's token ids"):
        train(TrainConfig.from_dict({**cfg.to_dict(), "out": str(tmp_path / "r3"), "data": str(shakespeare_data),
                                     "model": {"d_vocab": SIZE, "vocab": vocab}}))


def test_a_model_evaluated_on_data_in_another_vocabulary_is_refused(tiny_checkpoint, tiny_model, compacted, capsys):
    with pytest.raises(AnalysisError, match="compact vocabulary of 64 tokens, the model reads GPT-2's token ids"):
        check_data_vocab(tiny_model, compacted)
    with pytest.raises(SystemExit) as exit:
        cli.run(evaluate_main, [str(tiny_checkpoint), "--data", str(compacted), "--max-tokens", "64", "--no-progress"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "compact vocabulary" in err and "Traceback" not in err


def test_a_study_over_compact_data_resumes_without_retraining(compacted, tmp_path):
    study = resolve_study({"name": "c", "seeds": [0], "baseline": {
        "data": str(compacted), "batch_size": 2, "max_steps": 2, "eval_every": 2, "eval_batches": 1,
        "eval_batch_size": 2, "ckpt_every": 2, "sample_tokens": 0, "precision": "fp32", "tensorboard": False}})
    assert run_study(study, tmp_path / "study", log=lambda *a: None) == [("baseline", 0, "trained")]
    # The saved config holds the data's vocabulary; the study file does not: still the same run.
    assert run_study(study, tmp_path / "study", log=lambda *a: None) == [("baseline", 0, "skipped")]
