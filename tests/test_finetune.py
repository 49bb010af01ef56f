"""training.finetune and training.instructions: labels that mask the prompt, a loss that
falls on held-out responses, resumption, responses.jsonl, and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hooked_gpt2 import EOT_TOKEN, GPT2Config, HookedGPT2
from hooked_gpt2.tokenizer import get_tokenizer
from hooked_gpt2.losses import next_token_loss
from training import rundir
from training.finetune import FinetuneConfig, finetune, held_out_loss, main
from training.instructions import (
    ALPACA_TEMPLATE, IGNORE, InstructionDataError, collate, encode, fill, read_instructions, read_template,
)

REPO = Path(__file__).resolve().parents[1]
SHORT = {"prompt_input": "Q: {instruction} ({input})\nA:", "prompt_no_input": "Q: {instruction}\nA:"}
COLOURS = ["red", "blue", "green", "black", "white", "gold", "pink", "grey"]


def records(n: int = 24) -> list[dict]:
    """Instructions whose answers follow a pattern a small model picks up in a few steps."""
    out = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        out.append({"instruction": f"Say the colour {colour} twice.", "input": "" if i % 3 else "loudly",
                    "output": f" {colour} {colour}."})
    return out


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config(n_layers=1, d_model=32, n_heads=2, n_ctx=48, dropout=0.0))
    return model.save_pretrained(tmp_path_factory.mktemp("sft") / "start")


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records()))
    return path


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "template.json"
    path.write_text(json.dumps(SHORT))
    return path


def run_cfg(start, data_file, template_file, out, **kw) -> FinetuneConfig:
    base = dict(init=str(start), data=str(data_file), out=str(out), template=str(template_file), batch_size=4,
                val_fraction=0.25, max_steps=12, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_every=4, log_every=1,
                ckpt_every=4, precision="fp32", device="cpu", progress=False, max_new_tokens=6, peak_flops=1e12)
    return FinetuneConfig(**{**base, **kw})


def test_labels_mask_the_prompt_and_padding():
    tok = get_tokenizer()
    record = {"instruction": "Name a {colour}.", "input": "", "output": " red"}
    prompt = fill(ALPACA_TEMPLATE, record)
    assert "### Instruction:\nName a {colour}.\n\n### Response:\n" in prompt, "the record's braces stay as written"
    long, short = encode(tok, prompt, " red and blue", 128), encode(tok, "Q: hi\nA:", " red", 128)
    prompt_ids, reply_ids = tok.encode_ordinary(prompt), tok.encode_ordinary(" red and blue") + [EOT_TOKEN]
    assert long.tokens == prompt_ids + reply_ids and long.n_prompt == len(prompt_ids)
    inputs, labels = collate([long, short], response_only=True)
    assert inputs.shape == labels.shape == (2, len(long.tokens) - 1)
    assert inputs[0].tolist() == long.tokens[:-1]
    assert labels[0].tolist() == [IGNORE] * (len(prompt_ids) - 1) + reply_ids
    n_short = len(short.tokens)
    assert inputs[1, n_short - 1:].eq(EOT_TOKEN).all(), "padding"
    assert labels[1].tolist() == [IGNORE] * (short.n_prompt - 1) + short.tokens[short.n_prompt:] + \
        [IGNORE] * (inputs.shape[1] - n_short + 1)
    _, whole = collate([long, short], response_only=False)
    assert whole[0].tolist() == long.tokens[1:]
    assert whole[1, : n_short - 1].tolist() == short.tokens[1:] and whole[1, n_short - 1:].eq(IGNORE).all()
    # Truncation to the context keeps max_len + 1 tokens: max_len inputs, max_len targets.
    cut = encode(tok, prompt, " red and blue", len(prompt_ids) + 1)
    assert cut.tokens == prompt_ids + reply_ids[:2] and cut.n_prompt == len(prompt_ids)


def test_masked_loss_is_the_mean_over_response_tokens(tiny_model):
    tok = get_tokenizer()
    examples = [encode(tok, "Q: which colour?\nA:", " red, then blue", 64), encode(tok, "Q: two?\nA:", " 2", 64)]
    inputs, labels = collate(examples, response_only=True)
    loss = next_token_loss(tiny_model(inputs), labels=labels)
    per_token = []  # reference: each example alone, its response targets picked by hand
    for e in examples:
        losses = tiny_model.loss(torch.tensor([e.tokens]), per_token=True)[0]
        per_token += losses[e.n_prompt - 1:].tolist()
    assert loss.item() == pytest.approx(sum(per_token) / len(per_token), rel=1e-5)


def test_finetuning_lowers_held_out_response_loss(start, data_file, template_file, tmp_path):
    run = finetune(run_cfg(start, data_file, template_file, tmp_path / "run", max_steps=12, ckpt_every=8))
    config = json.loads((run / "config.json").read_text())
    held_out = config["derived"]["held_out_ids"]
    assert len(held_out) == 6 and config["derived"]["n_train"] == 18 and config["response_loss_only"] is True

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in rows if r["val_loss"] is not None}
    assert sorted(val) == [0, 4, 8, 12]
    assert val[12] < val[0] - 2.0 and val[12] < val[8], val

    # The recorded losses agree with the checkpoints, recomputed independently of the run.
    tok, template = get_tokenizer(), read_template(template_file)
    examples = [encode(tok, fill(template, records()[i]), records()[i]["output"], 48) for i in held_out]
    first = HookedGPT2.from_pretrained(rundir.step_dir(run, 0))
    last = HookedGPT2.from_pretrained(rundir.step_dir(run, 12))
    identity = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    assert held_out_loss(first, examples, 4, True, identity) == pytest.approx(val[0], rel=1e-5)
    assert held_out_loss(last, examples, 4, True, identity) == pytest.approx(val[12], rel=1e-5)
    assert [s for s, _ in rundir.list_checkpoints(run)] == [0, 8, 12]

    responses = [json.loads(line) for line in (run / "responses.jsonl").read_text().splitlines()]
    assert [r["id"] for r in responses] == held_out
    for r in responses:
        assert r["instruction"] == records()[r["id"]]["instruction"] and r["output"] == records()[r["id"]]["output"]
        prompt = tok.encode_ordinary(fill(template, records()[r["id"]]))
        greedy = last.generate(torch.tensor([prompt]), 6, temperature=0, stop_at_eos=True)[0, len(prompt):].tolist()
        assert r["response"] == tok.decode(greedy[: greedy.index(EOT_TOKEN)] if EOT_TOKEN in greedy else greedy)
        assert r["model"] == "run"


def test_whole_sequence_flag_puts_loss_on_the_prompt(start, data_file, template_file, tmp_path):
    assert main(["--init", str(start), "--data", str(data_file), "--out", str(tmp_path / "whole"), "--template",
                 str(template_file), "--whole-sequence", "--max-steps", "1", "--precision", "fp32", "--device", "cpu",
                 "--no-progress", "--val-fraction", "0.25", "--batch-size", "4", "--max-new-tokens", "2"]) == 0
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["response_loss_only"] is False
    tok, template = get_tokenizer(), read_template(template_file)
    ids = config["derived"]["held_out_ids"]
    examples = [encode(tok, fill(template, records()[i]), records()[i]["output"], 48) for i in ids]
    first = HookedGPT2.from_pretrained(rundir.step_dir(tmp_path / "whole", 0))
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    identity = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    assert rows[0]["val_loss"] == pytest.approx(held_out_loss(first, examples, 4, False, identity), rel=1e-5)
    assert rows[0]["val_loss"] != pytest.approx(held_out_loss(first, examples, 4, True, identity), rel=1e-3)


def test_resume_after_an_interrupt_ends_where_an_uninterrupted_run_does(start, data_file, template_file, tmp_path):
    straight = finetune(run_cfg(start, data_file, template_file, tmp_path / "straight", max_steps=6, eval_every=3))
    cut = run_cfg(start, data_file, template_file, tmp_path / "cut", max_steps=6, eval_every=3)
    finetune(cut, stop_after=2)
    assert not (tmp_path / "cut" / "responses.jsonl").exists()
    finetune(run_cfg(start, data_file, template_file, tmp_path / "cut", max_steps=6, eval_every=3, resume=True))
    a = HookedGPT2.from_pretrained(rundir.step_dir(straight, 6)).state_dict()
    b = HookedGPT2.from_pretrained(rundir.step_dir(tmp_path / "cut", 6)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "cut" / "responses.jsonl").read_text() == (straight / "responses.jsonl").read_text().replace(
        '"model": "straight"', '"model": "cut"')


def test_resume_refuses_a_changed_experiment_setting(start, data_file, template_file, tmp_path, capsys):
    finetune(run_cfg(start, data_file, template_file, tmp_path / "run", max_steps=4), stop_after=1)
    flags = ["--out", str(tmp_path / "run"), "--resume", "--no-progress"]
    assert main(flags + ["--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "['lr']" in err and "Traceback" not in err
    assert main(flags + ["--eval-every", "2", "--max-steps", "5"]) == 0  # bookkeeping and length may change
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [0, 2, 4, 5]


@pytest.mark.parametrize("content, problem", [
    (json.dumps([{"instruction": "a", "output": "b"}, {"input": "x", "output": "y"}]), 'record 1 has no "instruction"'),
    ('{"instruction": "a", "output": "b"}\n{"prompt": "x"}\n', ':2 has no "instruction"'),
    (json.dumps([{"instruction": "a"}]), 'record 0 has no "output"'),
    ("[{", "neither a JSON list nor JSON lines"),
])
def test_bad_instruction_file_is_one_clear_error(content, problem, start, tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InstructionDataError, match=problem):
        read_instructions(path)
    assert main(["--init", str(start), "--data", str(path), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and problem in err and err.count("\n") == 1 and "Traceback" not in err


def test_two_process_ddp_equals_one_process(start, data_file, template_file, tmp_path):
    # Every response is 4 labelled tokens, so the mean of the two ranks' mean losses is the
    # one-process mean over the same 4 examples, and the runs must agree.
    common = ["--init", str(start), "--data", str(data_file), "--template", str(template_file), "--max-steps", "3",
              "--lr", "1e-2", "--val-fraction", "0.25", "--eval-every", "3", "--log-every", "1", "--precision", "fp32",
              "--device", "cpu", "--no-progress", "--max-new-tokens", "2", "--peak-flops", "1e12"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "training.finetune", *common, "--batch-size", "2", "--out", str(tmp_path / "ddp")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(common + ["--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    rows = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(rows("ddp"), rows("one"), strict=True):
        assert a["step"] == b["step"]
        for key in ("train_loss", "val_loss", "grad_norm"):
            assert (a[key] is None) == (b[key] is None) and (a[key] is None or abs(a[key] - b[key]) < 1e-5), (a, b)
    assert (tmp_path / "ddp" / "responses.jsonl").read_text() == (tmp_path / "one" / "responses.jsonl").read_text(
        ).replace('"model": "one"', '"model": "ddp"')
