"""training.train: a few-step run end to end, resumption, accumulation, the intervention
flags, and the errors a user can cause. Models are tiny (d_model 32, 1 layer, 32 positions)."""

import json
import math

import pytest
import torch

from hooked_gpt2 import HookedGPT2
from training import rundir
from training import train as train_module
from training.config import TrainConfig, config_from_args
from training.evaluate import evaluate, fixed_val_batches
from training.precision import make_autocast
from training.state import TrainState
from training.train import TrainingError, main, train

SMALL = dict(d_model=32, n_layers=1, n_heads=2, n_ctx=32)


def small_cfg(data, out, **overrides) -> TrainConfig:
    model = {**SMALL, **overrides.pop("model", {})}
    base = dict(preset="tiny", model=model, data=str(data), out=str(out), batch_size=4, max_steps=12,
                lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=6, eval_batches=2, eval_batch_size=4, log_every=1,
                ckpt_every=8, sample_tokens=0, precision="fp32", progress=False, tensorboard=False,
                peak_flops=1e12)
    return TrainConfig(**{**base, **overrides})


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run) -> list[float]:
    return [r["train_loss"] for r in metrics(run) if r["train_loss"] is not None]


def test_run_writes_metrics_and_checkpoints_on_schedule(shakespeare_data, tmp_path):
    run = train(small_cfg(shakespeare_data, tmp_path / "run", sample_tokens=4))
    steps = [s for s, _ in rundir.list_checkpoints(run)]
    assert steps == [0, 1, 2, 4, 8, 12]
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(13))
    assert set(rows[1]) == {"step", "tokens_seen", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu"}
    assert rows[12]["tokens_seen"] == 12 * 4 * 32 and rows[12]["val_loss"] is not None and rows[5]["val_loss"] is None
    for step, path in rundir.list_checkpoints(run):
        model = HookedGPT2.from_pretrained(path)
        state = json.loads((path / "state.json").read_text())
        assert state["step"] == step and state["tokens_seen"] == step * 128
        assert model.cfg.d_model == 32
        assert (path / "resume").is_dir() == (step == 12), "resume state is kept for the latest only"
    # The last checkpoint is the trained model: its validation loss is the logged one.
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["d_model"] == 32 and cfg["data"] == str(shakespeare_data.resolve())
    batches = fixed_val_batches(cfg["data"], cfg["eval_batch_size"], cfg["seq_len"], cfg["eval_batches"])
    final = HookedGPT2.from_pretrained(run / "checkpoints" / "step_0000012")
    assert evaluate(final, batches) == pytest.approx(rows[12]["val_loss"], abs=1e-5)
    assert (run / "loss_curve.html").stat().st_size > 10_000
    assert (run / "samples.jsonl").is_file()


def test_loss_falls_on_shakespeare(shakespeare_data, tmp_path):
    run = train(small_cfg(shakespeare_data, tmp_path / "run", max_steps=30, eval_every=30, lr=1e-2, min_lr=1e-3))
    rows = metrics(run)
    assert rows[0]["val_loss"] == pytest.approx(math.log(50257), abs=0.3)  # uniform at initialisation
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 3.0, "the model should learn Shakespeare's unigrams at least"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_equals_uninterrupted_exactly(shakespeare_data, tmp_path, dropout):
    kw = dict(max_steps=10, ckpt_every=100, model=dict(dropout=dropout))
    whole = train(small_cfg(shakespeare_data, tmp_path / "whole", **kw))
    part = small_cfg(shakespeare_data, tmp_path / "part", **kw)
    train(part, stop_after=5)
    assert rundir.latest_resumable(tmp_path / "part").name == "step_0000005"
    assert len(train_losses(tmp_path / "part")) == 5
    train(TrainConfig.from_dict({**part.to_dict(), "resume": True}))
    assert train_losses(tmp_path / "part") == train_losses(whole)  # bitwise, dropout RNG included
    a = HookedGPT2.from_pretrained(whole / "checkpoints" / "step_0000010").state_dict()
    b = HookedGPT2.from_pretrained(tmp_path / "part" / "checkpoints" / "step_0000010").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_order_seed_changes_batches_and_resumes_bitwise(shakespeare_data, tmp_path):
    kw = dict(max_steps=10, ckpt_every=100, model=dict(dropout=0.1), data_order_seed=4)
    whole = train(small_cfg(shakespeare_data, tmp_path / "whole", **kw))
    part = small_cfg(shakespeare_data, tmp_path / "part", **kw)
    train(part, stop_after=5)
    train(TrainConfig.from_dict({**part.to_dict(), "resume": True}))
    assert train_losses(tmp_path / "part") == train_losses(whole)  # bitwise, shuffled order included
    # Same initialisation, other data orders: the first step's loss (same weights) differs by batch.
    other = train(small_cfg(shakespeare_data, tmp_path / "other", **{**kw, "max_steps": 1, "data_order_seed": 5}))
    in_order = train(small_cfg(shakespeare_data, tmp_path / "in_order", **{**kw, "max_steps": 1, "data_order_seed": None}))
    firsts = {train_losses(run)[0] for run in (whole, other, in_order)}
    assert len(firsts) == 3
    assert json.loads((whole / "config.json").read_text())["data_order_seed"] == 4
    with pytest.raises(TrainingError, match="data_order_seed"):  # a replicate field is fixed on resume
        train(TrainConfig.from_dict({**part.to_dict(), "resume": True, "max_steps": 12, "data_order_seed": 5}))


def test_resume_may_change_hardware_but_not_the_experiment(shakespeare_data, tmp_path):
    cfg = small_cfg(shakespeare_data, tmp_path / "run", max_steps=4, eval_every=100)
    train(cfg, stop_after=2)
    with pytest.raises(TrainingError, match=r"differ from the run's config.json: \['lr'\]; these describe the experiment"):
        train(TrainConfig.from_dict({**cfg.to_dict(), "resume": True, "lr": 1e-2}))
    with pytest.raises(TrainingError, match=r"\['seed'\]"):
        train(TrainConfig.from_dict({**cfg.to_dict(), "resume": True, "seed": 1}))
    # Hardware: half the micro-batch, accumulated twice to the same global batch; bookkeeping too.
    train(TrainConfig.from_dict({**cfg.to_dict(), "resume": True, "batch_size": 2, "global_batch_tokens": 4 * 32,
                                 "ddp_timeout_s": 60, "log_every": 2}))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["derived"]["grad_accum_steps"] == 2
    ref = train(small_cfg(shakespeare_data, tmp_path / "ref", max_steps=4, eval_every=100))
    assert train_losses(tmp_path / "run") == pytest.approx(train_losses(ref)[:2] + train_losses(ref)[3:], abs=1e-5)


def test_crash_during_save_leaves_previous_checkpoint(shakespeare_data, tmp_path, monkeypatch):
    cfg = small_cfg(shakespeare_data, tmp_path / "run", max_steps=6, ckpt_every=4)
    real_save = rundir.save_checkpoint

    def crash_at_4(run_dir, model, info, resume=None):
        if info["step"] == 4:  # die half-way: weights written, the rest not
            model.save_pretrained(run_dir / "checkpoints" / ".step_0000004.tmp")
            raise KeyboardInterrupt("simulated kill -9 during a save")
        return real_save(run_dir, model, info, resume)

    monkeypatch.setattr(rundir, "save_checkpoint", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(rundir, "save_checkpoint", real_save)
    assert rundir.latest_resumable(cfg.out).name == "step_0000002"
    HookedGPT2.from_pretrained(rundir.latest_resumable(cfg.out))
    train(TrainConfig.from_dict({**cfg.to_dict(), "resume": True}))
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp")), "resume cleans half-written checkpoints"
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(7)), "rows past the resumed step are redone once"
    assert train_losses(tmp_path / "run") == train_losses(train(small_cfg(shakespeare_data, tmp_path / "ref", max_steps=6, ckpt_every=4)))


def test_accumulated_micro_batches_equal_one_big_batch(shakespeare_data, tmp_path):
    big = train(small_cfg(shakespeare_data, tmp_path / "big", batch_size=4, max_steps=4))
    acc = train(small_cfg(shakespeare_data, tmp_path / "acc", batch_size=1, global_batch_tokens=4 * 32, max_steps=4))
    assert json.loads((acc / "config.json").read_text())["derived"]["grad_accum_steps"] == 4
    assert train_losses(acc) == pytest.approx(train_losses(big), abs=1e-5)
    assert [r["val_loss"] for r in metrics(acc)] == pytest.approx([r["val_loss"] for r in metrics(big)], abs=1e-5)


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(shakespeare_data, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = train_module.next_token_loss

    def nan_on_step_3(logits, tokens):
        calls["n"] += 1
        loss = real_loss(logits, tokens)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_module, "next_token_loss", nan_on_step_3)
    cfg = small_cfg(shakespeare_data, tmp_path / "run", eval_every=100)
    with pytest.raises(TrainingError, match="loss is nan at step 3.*step_0000002"):
        train(cfg)
    assert rundir.latest_resumable(cfg.out).name == "step_0000002"


# The interventions: each flag does what it says.
def test_qkv_bias_flag_adds_parameters(shakespeare_data, tmp_path):
    with_bias = train(small_cfg(shakespeare_data, tmp_path / "a", max_steps=1, model=dict(qkv_bias=True)))
    without = train(small_cfg(shakespeare_data, tmp_path / "b", max_steps=1, model=dict(qkv_bias=False)))
    a = HookedGPT2.from_pretrained(with_bias / "checkpoints" / "step_0000001")
    b = HookedGPT2.from_pretrained(without / "checkpoints" / "step_0000001")
    names_a, names_b = dict(a.named_parameters()), dict(b.named_parameters())
    assert set(names_a) - set(names_b) == {"blocks.0.attn.qkv.bias"}
    assert a.blocks[0].attn.qkv.bias.abs().sum() > 0, "the bias was trained"


def test_tie_embeddings_flag_shares_one_tensor(shakespeare_data, tmp_path):
    tied = HookedGPT2.from_pretrained(train(small_cfg(shakespeare_data, tmp_path / "t", max_steps=2)) / "checkpoints" / "step_0000002")
    untied = HookedGPT2.from_pretrained(train(small_cfg(shakespeare_data, tmp_path / "u", max_steps=2,
                                                        model=dict(tie_embeddings=False))) / "checkpoints" / "step_0000002")
    assert tied.unembed.weight is tied.embed.weight
    assert untied.unembed.weight is not untied.embed.weight
    assert not torch.equal(untied.unembed.weight, untied.embed.weight)


def test_dropout_off_makes_training_forward_deterministic():
    from hooked_gpt2 import GPT2Config

    tokens = torch.randint(0, 1000, (2, 16))
    for rate, same in ((0.0, True), (0.2, False)):
        model = HookedGPT2(GPT2Config.preset("tiny", **SMALL, d_vocab=1000, dropout=rate)).train()
        assert torch.equal(model(tokens), model(tokens)) is same
    assert config_from_args(["--dropout", "off"]).model["dropout"] == 0.0


@pytest.mark.parametrize("clip", [0.05, None])
def test_gradient_clipping_bounds_the_update(clip):
    """With plain SGD at lr 1 the update is the (clipped) gradient: its norm is at most the clip."""
    from hooked_gpt2 import GPT2Config
    from training.distributed import Dist

    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config.preset("tiny", **SMALL, d_vocab=1000)).train()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)

    class Loader:
        def next_batch(self):
            return torch.randint(0, 1000, (4, 33))

    cfg = TrainConfig(preset="tiny", model=dict(SMALL), grad_clip=clip)
    state = TrainState(model, opt, torch.amp.GradScaler("cpu", enabled=False), Loader())
    setup = train_module.Setup(cfg, Dist(), 1, make_autocast("fp32", torch.device("cpu")), model)
    _, grad_norm, _ = train_module.train_step(state, setup, lr=1.0)
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm().item()
    assert grad_norm > 0.05, "the test needs a gradient larger than the clip"
    if clip is None:
        assert update == pytest.approx(grad_norm, rel=1e-3), "no clipping: the whole gradient is applied"
    else:
        assert update == pytest.approx(clip, rel=1e-3), "the logged norm is the unclipped one; the update is clipped"


def test_weight_decay_groups_cover_every_parameter_once():
    from hooked_gpt2 import GPT2Config

    model = HookedGPT2(GPT2Config.preset("tiny", **SMALL, d_vocab=1000))
    opt = train_module.make_optimizer(model, TrainConfig(weight_decay=0.05), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# Errors a user can cause: one line, exit code 2, no traceback.
@pytest.mark.parametrize("argv, message", [
    (["--data", "/nonexistent/data"], "no prepared data at /nonexistent/data"),
    (["--global-batch-tokens", "1000"], "does not divide"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
    (["--n-heads", "5"], "d_model (32) must be divisible by n_heads (5)"),
    (["--resume"], "nothing to resume"),
])
def test_bad_options_give_clear_errors(shakespeare_data, tmp_path, capsys, argv, message):
    base = ["--preset", "tiny", "--d-model", "32", "--n-heads", "2", "--data", str(shakespeare_data),
            "--out", str(tmp_path / "run"), "--batch-size", "4", "--seq-len", "32", "--max-steps", "1", "--no-progress"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_unknown_preset_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "gpt5"])
    assert exit_info.value.code == 2 and "invalid choice: 'gpt5'" in capsys.readouterr().err


def test_existing_run_is_never_overwritten_silently(shakespeare_data, tmp_path, capsys):
    cfg = small_cfg(shakespeare_data, tmp_path / "run", max_steps=1)
    train(cfg)
    with pytest.raises(TrainingError, match="already exists.*--resume.*--overwrite"):
        train(cfg)
    train(TrainConfig.from_dict({**cfg.to_dict(), "overwrite": True}))


# Configuration and schedules.
def test_config_round_trips_and_flags_override_the_file(tmp_path):
    (tmp_path / "run.toml").write_text('preset = "tiny"\nlr = 0.01\nmax_steps = 7\n[model]\nd_model = 64\nqkv_bias = false\n')
    cfg = config_from_args(["--config", str(tmp_path / "run.toml"), "--lr", "0.02", "--no-tie-embeddings",
                            "--grad-clip", "off", "--schedule", "linear"])
    assert (cfg.preset, cfg.lr, cfg.max_steps, cfg.grad_clip, cfg.schedule) == ("tiny", 0.02, 7, None, "linear")
    mcfg = cfg.model_config()
    assert (mcfg.d_model, mcfg.qkv_bias, mcfg.tie_embeddings) == (64, False, False)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict() and again.model_config() == mcfg
    with pytest.raises(Exception, match="unknown training config keys"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_lr_schedule_and_checkpoint_steps():
    from training.schedule import checkpoint_steps, get_lr

    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert get_lr(0, schedule="cosine", **kw) == pytest.approx(0.1) and get_lr(9, schedule="cosine", **kw) == 1.0
    assert get_lr(60, schedule="cosine", **kw) == pytest.approx(0.55)
    assert get_lr(60, schedule="linear", **kw) == pytest.approx(0.55)
    assert get_lr(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert get_lr(80, schedule="constant", **kw) == 1.0
    assert checkpoint_steps(250, 100) == [0, 1, 2, 4, 8, 16, 32, 64, 100, 200, 250]
    assert checkpoint_steps(250, 100, log_spaced=False) == [0, 100, 200, 250]
