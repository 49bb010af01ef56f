"""analyses.evaluate: the same test loss through every loading path (checked against
transformers on the same windows), and HellaSwag scoring on a hand-made file."""

import json

import pytest
import torch

from analyses.evaluate import (
    HellaSwagError, ending_rows, main, read_hellaswag, score_hellaswag, split_windows,
)
from data_prep.reader import TokenDataset
from hooked_gpt2 import GPT2Config, HookedGPT2
from hooked_gpt2.tokenizer import get_tokenizer

GOOD, GOOD_LOGIT = " good", 10.0


def unigram_model() -> HookedGPT2:
    """A planted model that ignores its input: every position predicts " good" with logit
    10 and every other token with logit 0 (the blocks add nothing; the final layer norm's
    gain is zero, so its bias alone reaches the unembedding)."""
    cfg = GPT2Config(n_layers=1, d_model=8, n_heads=2, n_ctx=32, d_vocab=50257, tie_embeddings=False, dropout=0.0)
    model = HookedGPT2(cfg).eval()
    (good,) = get_tokenizer().encode_ordinary(GOOD)
    with torch.no_grad():
        model.blocks[0].attn.out.weight.zero_()
        model.blocks[0].attn.out.bias.zero_()
        model.blocks[0].mlp.fc_out.weight.zero_()
        model.blocks[0].mlp.fc_out.bias.zero_()
        model.ln_final.weight.zero_()
        model.ln_final.bias.zero_()
        model.ln_final.bias[0] = 1.0
        model.unembed.weight.zero_()
        model.unembed.weight[good, 0] = GOOD_LOGIT
    return model


# Per token, " good" has log-probability about -1.19 and any other token about -11.19.
# Example 2 is where the two metrics part: its right ending is three " good"s and a
# " bad" (sum -14.8, mean -3.7) against one " bad" (sum -11.2, mean -11.2), so only the
# length-normalised score picks it.
HAND_MADE = [
    {"ind": 0, "activity_label": "Test", "ctx_a": "A man is", "ctx_b": "", "ctx": "A man is",
     "endings": ["good good", "bad", "bad bad", "no"], "label": 0, "split": "val", "split_type": "indomain",
     "source_id": "hand-made"},
    {"ctx": "Then he", "endings": ["bad", "good good good bad", "bad bad", "bad bad bad"], "label": 1},
    {"ctx": "She", "endings": ["bad bad", "no", "good", "bad"], "label": "2"},
]


@pytest.fixture
def hellaswag_file(tmp_path):
    path = tmp_path / "hellaswag.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in HAND_MADE))
    return path


def test_planted_model_answers_hand_made_hellaswag(hellaswag_file):
    scores = score_hellaswag(unigram_model(), read_hellaswag(hellaswag_file), batch_size=2)
    assert scores["predictions_norm"] == [0, 1, 2]
    assert scores["predictions"] == [0, 0, 2], "by summed log-probability, the lone ' bad' wins example 2"
    assert scores["acc"] == pytest.approx(2 / 3) and scores["acc_norm"] == 1.0 and scores["n"] == 3


def test_hellaswag_batched_scores_match_one_row_at_a_time(tiny_model):
    # Long contexts are cut from the left to the model's 64 positions; rows pad to the longest.
    examples = [{"ctx": " ".join(["word"] * n), "endings": [f"{a} cat", "a dog ran off", "x", "the end of it all"],
                 "label": 0} for n, a in [(3, "one"), (70, "two"), (20, "three")]]
    model = tiny_model
    scores = score_hellaswag(model, examples, batch_size=2)
    expected, expected_norm = [], []
    for example in examples:
        rows, lengths = ending_rows(model, example)
        totals = []
        for row, n in zip(rows, lengths):
            assert len(row) <= model.cfg.n_ctx + 1
            per_token = model.loss(torch.tensor([row]), per_token=True)[0]
            totals.append((-per_token[-n:].sum().item(), n))
        expected.append(max(range(4), key=lambda i: totals[i][0]))
        expected_norm.append(max(range(4), key=lambda i: totals[i][0] / totals[i][1]))
    assert scores["predictions"] == expected and scores["predictions_norm"] == expected_norm


@pytest.mark.parametrize("line, problem", [
    ("not json", "is not JSON"),
    ('["ctx", "endings"]', "not an object"),
    ('{"endings": ["a", "b", "c", "d"], "label": 0}', '"ctx"'),
    ('{"ctx": "c", "endings": ["a", "b", "c"], "label": 0}', "list of 4"),
    ('{"ctx": "c", "endings": ["a", "b", "c", "d"], "label": 4}', '"label"'),
    ('{"ctx": "c", "endings": ["a", "b", "c", "d"]}', '"label"'),
])
def test_bad_hellaswag_line_is_one_clear_error(line, problem, hellaswag_file, tmp_path, capsys, tiny_checkpoint):
    path = tmp_path / "bad.jsonl"
    path.write_text(hellaswag_file.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(HellaSwagError, match=f"bad.jsonl:2 .*{problem}"):
        read_hellaswag(path)
    with pytest.raises(SystemExit) as exit_info:
        from analyses.cli import run
        run(main, [str(tiny_checkpoint), "--hellaswag", str(path), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl:2" in err and "Traceback" not in err


def test_checkpoint_and_its_hf_export_have_the_same_test_loss(tiny_model, shakespeare_data, tmp_path, capsys,
                                                              hellaswag_file):
    ours = tiny_model.save_pretrained(tmp_path / "ours")
    exported = tiny_model.save_hf(tmp_path / "exported")
    out = tmp_path / "eval.json"
    assert main([str(ours), str(exported), "--data", str(shakespeare_data), "--max-tokens", "1000",
                 "--batch-size", "5", "--hellaswag", str(hellaswag_file), "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["seq_len"] == 64 and result["tokens"] == 15 * 64, "whole windows only, the same for both"
    a, b = result["models"]
    assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-5)
    assert a["hellaswag"] == b["hellaswag"]
    table = capsys.readouterr().out
    assert f"{a['test_loss']:.4f}" in table and str(ours) in table and str(exported) in table

    # Reference: transformers on the same windows, read from the split independently.
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(exported).eval()
    stream = torch.from_numpy(TokenDataset(shakespeare_data, "val").read(0, 15 * 64 + 1))
    windows = torch.stack([stream[i * 64 : i * 64 + 65] for i in range(15)])
    assert torch.equal(windows, split_windows(shakespeare_data, "val", 64, 1000))
    with torch.no_grad():
        logits = hf(windows[:, :-1]).logits
        reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert a["test_loss"] == pytest.approx(reference, abs=1e-5)

    beside = json.loads((ours / "evaluation.json").read_text())
    (loss,) = beside["test_loss"].values()
    assert loss["loss"] == a["test_loss"] and loss["tokens"] == 15 * 64
    assert list(beside["hellaswag"].values()) == [a["hellaswag"]]
    assert not (exported / "evaluation.json").exists(), "only our checkpoints get evaluation.json"
