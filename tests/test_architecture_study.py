"""studies/architecture.toml: each architecture change alone against the GPT-2 baseline.
The file's variants are checked against the fields they should set, and a shortened run
of the whole study (tiny shapes, 2 steps, one seed) trains every variant and compares them."""

import dataclasses
import tomllib
from pathlib import Path

from analyses import compare_runs
from hooked_gpt2 import GPT2Config, HookedGPT2
from hooked_gpt2.config import LLAMA_ARCHITECTURE
from training.config import TrainConfig
from training.study import load_study, resolve_study, run_study

STUDY = Path("studies/architecture.toml")


def test_each_variant_changes_its_architecture_fields_only():
    study = load_study(STUDY)
    variants = {name: TrainConfig.from_dict(v["config"]).model_config() for name, v in study["variants"].items()}
    baseline = variants["baseline"]
    assert baseline == GPT2Config.preset("mini")  # GPT-2 at the CPU studies' scale
    changed = {
        name: {f.name for f in dataclasses.fields(GPT2Config) if getattr(cfg, f.name) != getattr(baseline, f.name)}
        for name, cfg in variants.items()
    }
    assert changed == {
        "baseline": set(),
        "rotary": {"positional", "rotary_dim"},
        "rmsnorm": {"norm"},
        "swiglu": {"mlp", "d_mlp"},
        "qk_norm": {"qk_norm"},
        "no_biases": {"qkv_bias", "attn_bias", "mlp_bias"},
        "untied_embeddings": {"tie_embeddings"},
        "llama_style": set(LLAMA_ARCHITECTURE) | {"d_mlp", "rotary_dim"},
    }
    llama = variants["llama_style"]
    assert llama == GPT2Config.preset("llama-style")  # the stack is the preset
    for name in ("swiglu", "llama_style"):  # SwiGLU at about GPT-2's MLP parameters
        assert abs(variants[name].n_params(embeddings=False) / baseline.n_params(embeddings=False) - 1) < 0.02


def test_a_short_run_of_the_study_trains_and_compares_every_variant(shakespeare_data, tmp_path):
    raw = tomllib.loads(STUDY.read_text())
    raw["seeds"] = [0]
    raw["baseline"] |= dict(
        data=str(shakespeare_data), max_steps=2, eval_every=2, eval_batches=1, eval_batch_size=2, batch_size=2,
        log_every=1, ckpt_every=2, ckpt_log_spaced=False, precision="fp32", progress=False, peak_flops=1e12,
        model=dict(d_model=32, n_layers=1, n_heads=2, n_ctx=32),
    )
    raw["variants"]["swiglu"]["model"]["d_mlp"] = 86
    study = resolve_study(raw, "architecture")
    out = tmp_path / "study"
    actions = run_study(study, out, log=lambda *a: None)
    assert [(v, a) for v, _, a in actions] == [(v, "trained") for v in study["variants"]]
    for variant, spec in study["variants"].items():
        model = HookedGPT2.from_pretrained(out / variant / "seed_0" / "checkpoints" / "step_0000002")
        for field, value in spec["config"]["model"].items():
            assert getattr(model.cfg, field) == value, (variant, field)
    result = compare_runs.compare([out])
    assert set(result["variants"]) == set(study["variants"])
    assert all(len(v["final_val_loss"]) == 1 and v["final_val_loss"][0] < 11 for v in result["variants"].values())
