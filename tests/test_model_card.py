"""save_hf's README.md model card: the run's settings, the checkpoint's state and the
evaluation results found beside the checkpoint."""

import json

from analyses.evaluate import main as evaluate_main
from hooked_gpt2 import GPT2Config, HookedGPT2
from hooked_gpt2.hf_interop import save_hf
from hooked_gpt2.model_card import model_card
from training import rundir
from training.config import TrainConfig
from training.train import train


def test_card_names_the_runs_settings_and_evaluation(shakespeare_data, tmp_path):
    cfg = TrainConfig(preset="tiny", model=dict(d_model=32, n_layers=1, n_heads=2, n_ctx=32, dropout=0.0,
                                                qkv_bias=False), data=str(shakespeare_data), out=str(tmp_path / "card-run"),
                      batch_size=2, max_steps=3, lr=2.5e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.05,
                      schedule="linear", eval_every=3, eval_batches=1, eval_batch_size=2, sample_tokens=0,
                      precision="fp32", progress=False, tensorboard=False, peak_flops=1e12, seed=7)
    run = train(cfg)
    step, ckpt = rundir.list_checkpoints(run)[-1]
    assert evaluate_main([str(ckpt), "--data", str(shakespeare_data), "--max-tokens", "320", "--no-progress"]) == 0
    loss = next(iter(json.loads((ckpt / "evaluation.json").read_text())["test_loss"].values()))["loss"]

    out = HookedGPT2.from_pretrained(ckpt).save_hf(tmp_path / "export")  # the source is remembered
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "# card-run" in card
    for setting in ["lr=0.0025", "min_lr=0.0001", "schedule=linear", "weight_decay=0.05", "precision=fp32",
                    "seed=7", "warmup_steps=1", "Trained from scratch (preset `tiny`)", str(shakespeare_data),
                    f"step {step} of 3, after {3 * 2 * 32:,} tokens",
                    "Differs from OpenAI's GPT-2 in: dropout=0.0, qkv_bias=false.", "| d_model | 32 |",
                    f"| test loss | `{shakespeare_data.resolve()}:val` | {loss:.4f} (320 tokens, windows of 32) |"]:
        assert setting in card, setting
    from transformers import GPT2LMHeadModel
    GPT2LMHeadModel.from_pretrained(out)  # the card does not disturb loading


def test_card_of_a_model_without_a_run_says_what_its_config_says(tiny_model, tmp_path):
    card = (tiny_model.save_hf(tmp_path / "bare") / "README.md").read_text()
    assert "# hooked-gpt2 model" in card and "## Training" not in card
    assert "| n_layers | 2 |" in card and "No evaluation results" in card
    assert card == model_card(tiny_model.cfg)


def test_card_says_how_each_kind_of_export_loads(tiny_model, tmp_path):
    native = (tiny_model.save_hf(tmp_path / "gpt2") / "README.md").read_text()
    assert "tags: [gpt2, hooked-gpt2]\n" in native and "trust_remote_code" not in native
    assert "load as `transformers`' own `GPT2LMHeadModel`" in native and "GPT-2's tokenizer (50,257 tokens)" in native
    assert 'AutoModelForCausalLM.from_pretrained("THIS_REPO")' in native and "HookedGPT2.from_hf" in native

    vocab = list(range(60)) + [50256, -1]  # a compact vocabulary: GPT-2 ids, <|endoftext|>, the catch-all
    demo = HookedGPT2(GPT2Config.preset("demo", d_vocab=len(vocab), vocab=vocab))
    card = (demo.save_hf(tmp_path / "demo") / "README.md").read_text()
    assert "tags: [gpt2, hooked-gpt2, custom_code]" in card
    assert "No `transformers` class computes this architecture exactly: as GPT-2 it has positional='rotary'" in card
    assert "as Llama it has norm='layernorm'" in card and "class `HookedGPT2ForCausalLM`" in card
    assert "The vocabulary is compact: 62 token ids" in card and "except id 61" in card
    for command in ['AutoModelForCausalLM.from_pretrained("THIS_REPO", trust_remote_code=True)',
                    'AutoTokenizer.from_pretrained("THIS_REPO", trust_remote_code=True)',
                    'pipeline("text-generation", model="THIS_REPO", trust_remote_code=True)']:
        assert command in card, command
    assert "| vocab | compact, 62 ids (compact_vocab.json) |" in card

    forced = (save_hf(tiny_model, tmp_path / "forced", architecture="HookedGPT2ForCausalLM") / "README.md").read_text()
    assert "It was exported with its own code on request (it would also load as `GPT2LMHeadModel`)" in forced
    assert "| vocab | null |" in forced and "GPT-2's tokenizer (50,257 tokens)" in forced
