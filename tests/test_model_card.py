"""save_hf's README.md model card: the run's settings, the checkpoint's state and the
evaluation results found beside the checkpoint."""

import json

from analyses.evaluate import main as evaluate_main
from hooked_gpt2 import HookedGPT2
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
