"""analyses.over_training: every metric for every checkpoint of a tiny real run, cached and
picked up as the run goes on; the planted induction head scaled up over fake checkpoints;
the report in headless Chromium; user errors."""

import json
import re

import pytest
import torch

from analyses import over_training as ot
from analyses.formation import k_composition
from tests.planted import INDUCTION_HEAD, PREV_HEAD, build_planted_induction_model
from tests.test_analyses_browser import CHROMIUM, chromium
from training import rundir
from training.config import TrainConfig
from training.train import train

ALL = list(ot.METRICS)


def tiny_cfg(data, out, **overrides) -> TrainConfig:
    base = dict(preset="tiny", model=dict(d_model=32, n_layers=2, n_heads=2, n_ctx=32), data=str(data), out=str(out),
                batch_size=2, max_steps=8, warmup_steps=1, eval_every=4, eval_batches=1, eval_batch_size=2,
                log_every=1, ckpt_every=4, sample_tokens=0, precision="bf16", progress=False, tensorboard=False,
                peak_flops=1e12)
    return TrainConfig(**{**base, **overrides})


class Log(list):
    def __call__(self, message):
        self.append(message)


@pytest.fixture(scope="module")
def live_run(shakespeare_data, tmp_path_factory):
    """A tiny run stopped half-way, as if still training (checkpoints 0, 1, 2, 4)."""
    cfg = tiny_cfg(shakespeare_data, tmp_path_factory.mktemp("ot") / "run")
    run = train(cfg, stop_after=4)
    return cfg, run


def test_every_metric_every_checkpoint_cached_and_new_checkpoints_picked_up(live_run):
    cfg, run = live_run
    log = Log()
    first = ot.over_training(run, ALL, icl_seq_len=8, icl_batch=2, log=log)
    assert [r["step"] for r in first["checkpoints"]] == [0, 1, 2, 4]
    assert len(log) == 4 and all("val_loss, icl, heads, logit_lens, ablation" in m for m in log)
    for row in first["checkpoints"]:
        assert row["tokens_seen"] == row["step"] * 2 * 32
        assert set(row["heads"]) == {"previous_token", "duplicate_token", "induction"}
        assert torch.tensor(row["heads"]["induction"]).shape == (2, 2)
        assert torch.tensor(row["ablation"]).shape == (2, 2)
        assert len(row["logit_lens"]) == 2 and row["icl"] == pytest.approx(row["icl_first"] - row["icl_second"])
        assert 0 < row["val_loss"] < 12
        # Natural text from the run's validation split; K-composition of every layer-0/layer-1 pair.
        assert row["icl_text"] == pytest.approx(row["icl_text_late"] - row["icl_text_early"])
        assert torch.tensor(row["composition"]).shape == (2, 2)
    assert "1,000 most frequent tokens" in first["options"]["probe_tokens"]
    # The validation loss is recomputed on the run's own batches: it equals the logged one.
    logged = {r["step"]: r["logged_val_loss"] for r in first["checkpoints"] if r["logged_val_loss"] is not None}
    assert set(logged) == {0, 4}
    for row in first["checkpoints"]:
        if row["step"] in logged:
            assert row["val_loss"] == pytest.approx(logged[row["step"]], abs=1e-5)
    # The last layer's logit-lens loss on the first validation batch is the model's loss there
    # (only one batch is evaluated, so it is the validation loss up to bf16 autocast).
    assert first["checkpoints"][-1]["logit_lens"][-1] == pytest.approx(first["checkpoints"][-1]["val_loss"], abs=0.05)

    # A re-run computes nothing; a changed option recomputes only the metrics it affects.
    log.clear()
    again = ot.over_training(run, ALL, icl_seq_len=8, icl_batch=2, log=log)
    assert log == [] and again["checkpoints"] == first["checkpoints"]
    ot.over_training(run, ["val_loss", "icl"], icl_seq_len=6, icl_batch=2, log=log)
    assert log and all(m.endswith("computing icl") for m in log)

    # The run continues: only the new checkpoint is analysed.
    train(TrainConfig.from_dict({**cfg.to_dict(), "resume": True}))
    log.clear()
    later = ot.over_training(run, ALL, icl_seq_len=8, icl_batch=2, log=log)
    assert [r["step"] for r in later["checkpoints"]] == [0, 1, 2, 4, 8]
    assert log == ["step 8: computing " + ", ".join(ALL)]
    assert later["checkpoints"][-1]["val_loss"] == pytest.approx(later["checkpoints"][-1]["logged_val_loss"], abs=1e-5)
    assert later["checkpoints"][:4] == first["checkpoints"]


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """The planted model with its induction head scaled 0, 0.1, ..., 1: checkpoints 0..100."""
    run = tmp_path_factory.mktemp("planted") / "run"
    for i in range(11):
        path = build_planted_induction_model(i / 10).save_pretrained(rundir.step_dir(run, 10 * i))
        (path / "state.json").write_text(json.dumps({"step": 10 * i, "tokens_seen": 10 * i * 1000}))
    (run / "config.json").write_text("{}\n")  # no data: validation loss is skipped, with a note
    return run


@pytest.fixture(scope="module")
def planted_report(planted_run):
    assert ot.main([str(planted_run), "--metrics", ",".join(ALL)]) == 0
    return planted_run / "analysis"


def test_planted_induction_rises_monotonically_and_crossing_is_marked(planted_report):
    results = json.loads((planted_report / "over_training.json").read_text())
    rows = results["checkpoints"]
    layer, head = INDUCTION_HEAD
    scores = [r["heads"]["induction"][layer][head] for r in rows]
    assert all(b >= a - 1e-6 for a, b in zip(scores, scores[1:])), scores
    assert scores[0] < 0.1 and scores[-1] > 0.99
    icl = [r["icl"] for r in rows]
    assert all(b > a for a, b in zip(icl, icl[1:])), icl
    assert abs(icl[0]) < 1e-6 and icl[-1] > 3
    # The first scale whose score reaches 0.5 is the marked crossing.
    first = next(r for r, s in zip(rows, scores) if s >= 0.5)
    assert results["crossing"]["step"] == first["step"] == 20 and results["crossing"]["head"] == [layer, head]
    assert all(r["val_loss"] is None for r in rows) and "validation loss skipped" in results["notes"][0]
    # The story is read off the checkpoints: the planted previous-token head is there from the start,
    # the induction head crosses at step 20; K-composition is each checkpoint's own weights'.
    formed = results["formation"]
    assert formed["induction_head"] == [layer, head] and formed["previous_token_head"] == list(PREV_HEAD)
    assert formed["previous_token_crossings"]["L0H0"] == 0 and formed["induction_crossings"]["L1H0"] == 20
    assert [v["step"] for v in formed["views"]] == [10, 20, 100]  # 0.1 is the last scale below 0.25
    for row in rows:
        model = build_planted_induction_model(row["step"] / 100)
        assert torch.allclose(torch.tensor(row["composition"]), k_composition(model), atol=1e-6)
        assert row["icl_text"] is None  # no data: no natural text
    assert rows[0]["composition"][0][0] == 0 and rows[-1]["composition"][0][0] > 0.05
    before, after = (torch.tensor(formed["views"][i]["pattern"]) for i in (0, -1))
    n = (after.shape[0] - 1) // 2
    query = torch.arange(n + 1, 2 * n + 1)  # the repeat; its induction key is n - 1 back
    assert after[query, query - (n - 1)].mean() > 0.9 > before[query, query - (n - 1)].mean()
    assert formed["views"][-1]["icl"] > formed["views"][0]["icl"] + 1
    # Ablating the induction head costs the second repetition its in-context advantage.
    assert rows[-1]["ablation"][layer][head] > 3
    html = (planted_report / "over_training.html").read_text()
    assert re.search(r"induction score (>|&gt;|\\u003e)= 0.5 at step 20", html), "the crossing line on the ICL plot"
    assert "first reaches 0.5 at step 20" in html
    assert re.search(r"previous-token score (>|&gt;|\\u003e)= 0.5 at step 0", html), "the first crossing's line"
    assert "The previous-token head formed first." in html
    assert html.count("circuits-vis-") >= 1 and "step 20 (during)" in html
    assert '"linear x"' in html and "switch it to linear" in html


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (.ci/run installs Debian's chromium)")
def test_report_renders_in_headless_chromium(planted_report, tmp_path):
    page = planted_report / "over_training.html"
    expected = page.read_text().count('class="plotly-graph-div"')
    assert expected >= 7
    dom = chromium(page, tmp_path, "--dump-dom")
    body = re.search(r"<body([^>]*)>", dom)
    assert body and 'data-rendered="true"' in body.group(1), dom[:2000]
    assert f'data-plots="{expected}"' in body.group(1), body.group(1)
    errors = re.search(r'<pre id="report-errors">(.*?)</pre>', dom, re.S)
    assert errors is not None and errors.group(1).strip() == "", errors.group(1)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "has no checkpoints"),
    ("metric", "unknown metrics"),
])
def test_user_errors_exit_2_without_traceback(case, message, tmp_path, capsys):
    run = tmp_path / "run"
    if case != "missing":
        (run / "checkpoints").mkdir(parents=True)
    argv = [str(run)] + (["--metrics", "icl,nope"] if case == "metric" else [])
    with pytest.raises(SystemExit) as exit_info:
        ot.cli.run(ot.main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_recomputed_losses_autocast_on_the_analysis_device_and_cache_by_device(live_run):
    cfg, run = live_run
    config = json.loads((run / "config.json").read_text())
    for device in ("cpu", "cuda"):
        val = ot.ValidationData(config, torch.device(device))
        autocast = val.autocast()
        assert (autocast.device, autocast.fast_dtype) == (device, torch.bfloat16), "the run's bf16, on this device"
    options = {"icl_seq_len": 8, "icl_batch": 2, "seed": 0, "ablation_method": "mean"}
    val = ot.ValidationData(config, torch.device("cpu"), probe_top=100)
    for metric in ot.METRICS:
        assert ot._key(metric, options, val, torch.device("cpu")) != ot._key(metric, options, val, torch.device("cuda"))
        assert ot._key(metric, options, val, torch.device("cuda:0")) == ot._key(metric, options, val, torch.device("cuda:1"))


def test_the_analyses_default_to_the_device_training_uses():
    from analyses import cli

    assert cli.parser("analyses.x", "x").parse_args(["--checkpoint", "c", "--out", "o"]).device == "auto"
    assert ot.over_training.__kwdefaults__["device"] == "auto"


def test_probes_draw_from_the_tokens_the_run_repeated():
    """A run trained on repeated spans is probed with the tokens its spans were made of;
    any other run with its 1,000 most frequent tokens; an explicit --probe-top wins."""
    assert ot.default_probe_top({"repeat_fraction": 0.75, "repeat_vocab": 256}) == 256
    assert ot.default_probe_top({"repeat_fraction": 0.0, "repeat_vocab": 256}) == 1000
    assert ot.default_probe_top({}) == 1000


def test_the_crossing_ignores_layer_0_in_a_deeper_model():
    """A layer-0 head cannot read the previous token from an earlier head, so its induction
    score on the probe is a fixed-offset coincidence: the crossing waits for layer 1."""
    rows = [{"step": 0, "tokens_seen": 0, "heads": {"induction": [[0.9, 0.1], [0.2, 0.3]]}},
            {"step": 10, "tokens_seen": 100, "heads": {"induction": [[0.95, 0.1], [0.6, 0.3]]}}]
    crossing = ot.induction_crossing(rows)
    assert (crossing["step"], crossing["head"]) == (10, [1, 0]) and crossing["score"] == pytest.approx(0.6)
    one_layer = [{"step": 0, "tokens_seen": 0, "heads": {"induction": [[0.2, 0.7]]}}]
    assert ot.induction_crossing(one_layer)["head"] == [0, 1]


def test_crossings_at_one_checkpoint_are_marked_once():
    """A previous-token and an induction head that cross together get one line and one
    label (two would be drawn over each other); apart, each gets its own."""
    together = {"formation": {"previous_token_crossings": {"L0H1": 1400, "L0H2": None}}, "crossing": {"step": 1400}}
    assert ot.crossing_marks(together) == [(1400, "previous-token and induction scores >= 0.5 at step 1400", "red")]
    apart = {"formation": {"previous_token_crossings": {"L0H1": 1200}}, "crossing": {"step": 1400}}
    assert [m[0] for m in ot.crossing_marks(apart)] == [1200, 1400]
    assert ot.crossing_marks({"formation": None, "crossing": None}) == []
