"""training.study and analyses.compare_runs: a 2-variant x 2-seed study on a tiny config
runs, resumes after an interruption without redoing finished runs, and the comparison
equals a direct computation from the runs' metrics files."""

import json
import math
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest
import scipy.stats

from analyses import compare_runs
from tests.test_analyses_browser import CHROMIUM, chromium
from training import rundir
from training import study as study_module
from training.config import TrainConfig
from training.train import TrainingError
from training.study import StudyError, StudyInterrupted, load_study, resolve_study, run_config, run_study

STUDY_TOML = """
name = "tiny"
seeds = [3, 7]

[baseline]
preset = "tiny"
data = "{data}"
batch_size = 2
max_steps = 6
warmup_steps = 1
eval_every = 3
eval_batches = 1
eval_batch_size = 2
log_every = 1
ckpt_every = 3
ckpt_log_spaced = false
sample_tokens = 0
precision = "fp32"
grad_clip = "off"
tensorboard = false
peak_flops = 1e12
model = {{ d_model = 32, n_layers = 1, n_heads = 2, n_ctx = 32, dropout = 0.1 }}

[variants.no_dropout]
model = {{ dropout = "off" }}
"""


def write_study(tmp_path, data, text=STUDY_TOML):
    path = tmp_path / "study.toml"
    path.write_text(text.format(data=data))
    return path


def final_row_val_loss(run) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["val_loss"]


@pytest.fixture(scope="module")
def tiny_study(shakespeare_data, tmp_path_factory):
    """The study, interrupted in its third run, then run again to the end."""
    tmp = tmp_path_factory.mktemp("study")
    study = load_study(write_study(tmp, shakespeare_data))
    out = tmp / "out"
    calls = []
    real_train = study_module.train

    def interrupt_third(cfg, stop_after=None):
        calls.append(cfg.out)
        return real_train(cfg, stop_after=3 if len(calls) == 3 else stop_after)

    mp = pytest.MonkeyPatch()
    mp.setattr(study_module, "train", interrupt_third)
    try:
        with pytest.raises(StudyInterrupted, match="no_dropout seed 3"):
            run_study(study, out, log=lambda *a: None)
    finally:
        mp.undo()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("baseline/seed_*/checkpoints/*/model.safetensors")}
    assert len(finished) == 2 * 3  # checkpoints 0, 3, 6 of both baseline seeds
    actions = run_study(study, out, log=lambda *a: None)
    return study, out, calls, actions, finished


def test_study_resumes_without_redoing_finished_runs(tiny_study):
    study, out, calls, actions, finished = tiny_study
    assert [c.rsplit("/", 2)[-2:] for c in calls] == [["baseline", "seed_3"], ["baseline", "seed_7"], ["no_dropout", "seed_3"]]
    assert actions == [("baseline", 3, "skipped"), ("baseline", 7, "skipped"),
                       ("no_dropout", 3, "resumed"), ("no_dropout", 7, "trained")]
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items()), "a finished run was retrained"
    for variant in ("baseline", "no_dropout"):
        for seed in (3, 7):
            run = out / variant / f"seed_{seed}"
            config = json.loads((run / "config.json").read_text())
            assert config["seed"] == seed and config["model"]["dropout"] == (0.1 if variant == "baseline" else 0.0)
            assert rundir.run_status(run) == "finished"
            steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert steps == list(range(7)), "the resumed run's metrics continue without gaps or repeats"
    assert json.loads((out / "study.json").read_text())["seeds"] == [3, 7]
    # A third run of the finished study trains nothing.
    assert all(a == "skipped" for *_, a in run_study(study, out, log=lambda *a: None))


def test_compare_runs_equals_direct_computation(tiny_study, capsys):
    _, out, *_ = tiny_study
    finals = {v: [final_row_val_loss(out / v / f"seed_{s}") for s in (3, 7)] for v in ("baseline", "no_dropout")}
    result = compare_runs.compare([out])
    assert result["baseline"] == "baseline"
    for variant, losses in finals.items():
        v = result["variants"][variant]
        assert v["final_val_loss"] == losses
        assert v["mean"] == pytest.approx(sum(losses) / 2, abs=1e-12)
        assert v["std"] == pytest.approx(abs(losses[0] - losses[1]) / math.sqrt(2), abs=1e-12)  # ddof=1
    b, n = finals["baseline"], finals["no_dropout"]
    welch = result["variants"]["no_dropout"]["welch"]
    assert welch["diff"] == pytest.approx(statistics.mean(n) - statistics.mean(b), abs=1e-12)
    se = math.sqrt(statistics.variance(n) / 2 + statistics.variance(b) / 2)
    assert welch["high"] - welch["diff"] == pytest.approx(compare_runs.t_quantile(0.975, welch["df"]) * se, rel=1e-9)
    assert 1 <= welch["df"] <= 2  # Welch-Satterthwaite with two runs a side
    assert welch["exceeds_noise"] == (not welch["low"] <= 0 <= welch["high"])
    pair = result["variants"]["no_dropout"]["paired"]
    assert pair["diff"] == pytest.approx(statistics.mean([x - y for x, y in zip(n, b)]), abs=1e-12) and pair["n"] == 2
    # The same comparison from the run directories themselves.
    runs = [out / v / f"seed_{s}" for v in ("baseline", "no_dropout") for s in (3, 7)]
    direct = compare_runs.compare(runs)
    assert {k: v["final_val_loss"] for k, v in direct["variants"].items()} == finals
    # The command line prints the Markdown table and writes the report beside the study.
    assert compare_runs.main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"| baseline | 2 | {statistics.mean(b):.4f} ± {statistics.stdev(b):.4f} |" in printed
    assert f"{welch['diff']:+.4f} [{welch['low']:+.4f}, {welch['high']:+.4f}]" in printed
    assert (out / "comparison.md").read_text() in printed
    assert "Welch" in (out / "comparison.html").read_text()


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423), (1e6, 1.9600)])
def test_t_quantile_matches_tables(df, expected):
    assert compare_runs.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert compare_runs.t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (.ci/run installs Debian's chromium)")
@pytest.mark.parametrize("which", ["computed", "planted"])
def test_comparison_report_renders_in_headless_chromium(which, tiny_study, planted_study, tmp_path):
    """The loss curves and one curve per learned metric, variants overlaid with seed bands,
    drawn offline: over_training computed on the real tiny runs, or planted (values that vary)."""
    out = tiny_study[1] if which == "computed" else planted_study[0]
    result = compare_runs.compare([out], log=lambda *a: None)
    page = compare_runs.write_report(result, tmp_path / "comparison.html")
    source = page.read_text()
    expected = source.count('class="plotly-graph-div"')
    assert expected == 2 + len(compare_runs.learned.CURVES)
    dom = chromium(page, tmp_path, "--dump-dom")
    body = re.search(r"<body([^>]*)>", dom)
    assert body and 'data-rendered="true"' in body.group(1), dom[:2000]
    assert f'data-plots="{expected}"' in body.group(1), body.group(1)
    errors = re.search(r'<pre id="report-errors">(.*?)</pre>', dom, re.S)
    assert errors is not None and errors.group(1).strip() == "", errors.group(1)
    # Each learned metric's plot is drawn with its title, and each variant's mean line and band.
    for label, _ in compare_runs.learned.CURVES.values():
        assert label in dom
    assert dom.count('class="trace scatter') >= 2 * 2 * expected, "a band and a mean line per variant per plot"
    assert "What the models learned" in dom and "Differences beyond seed noise" in dom
    if which == "planted":
        assert "in-context learning score at the last checkpoint is higher than in baseline" in dom
        assert "baseline (1 of 2 runs have it)" in dom  # the head-ablation share: seed 7 has no ablation
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", source)


def test_reference_study_file_has_every_intervention():
    study = load_study("studies/reference_interventions.toml")
    variants = study["variants"]
    base = variants["baseline"]["config"]
    assert {k: base["model"][k] for k in ("dropout", "qkv_bias", "tie_embeddings")} == \
        {"dropout": 0.1, "qkv_bias": False, "tie_embeddings": False}
    assert (base["grad_clip"], base["weight_decay"], base["schedule"], base["precision"]) == (None, 0.01, "constant", "bf16")
    assert variants["no_dropout"]["config"]["model"]["dropout"] == 0.0
    assert variants["qkv_bias"]["config"]["model"]["qkv_bias"] is True
    assert variants["tied_embeddings"]["config"]["model"]["tie_embeddings"] is True
    assert variants["grad_clip"]["config"]["grad_clip"] == 1.0
    assert variants["weight_decay_0_1"]["config"]["weight_decay"] == 0.1
    assert variants["lr_schedule"]["config"]["schedule"] == "cosine"
    assert variants["fp32"]["config"]["precision"] == "fp32"
    stacked = variants["stacked"]
    assert stacked["stack"] and stacked["config"]["model"]["dropout"] == 0.0 and stacked["config"]["weight_decay"] == 0.1
    assert "tied_embeddings" not in stacked["stack"] and stacked["config"]["model"]["tie_embeddings"] is False, \
        "the reference found weight tying harmful"


def test_circuits_study_has_the_seven_interventions_and_the_repeats_with_three_seeds_of_both_noises(tmp_path):
    study = load_study("studies/interventions_circuits.toml")
    assert study["seeds"] == [0, 1, 2] and study["vary"] == "both"
    variants = study["variants"]
    base = variants["baseline"]["config"]
    # The demo's induction recipe as it was when the study ran (docs/studies/interventions_circuits.md:
    # three rows in four repeated, a constant rate after 30 warm-up steps; the demo's defaults have
    # moved on since), over a compact vocabulary, with the reference's baseline settings.
    recipe = TrainConfig(preset="demo")
    assert (base["preset"], base["data"], base["max_steps"]) == ("demo", "data/python-stdlib-v1024", 3000)
    assert {k: base[k] for k in ("batch_size", "lr", "repeat_vocab", "repeat_span")} \
        == {k: getattr(recipe, k) for k in ("batch_size", "lr", "repeat_vocab", "repeat_span")}
    assert (base["warmup_steps"], base["repeat_fraction"]) == (30, 0.75)
    assert {k: base["model"][k] for k in ("dropout", "qkv_bias", "tie_embeddings")} == \
        {"dropout": 0.1, "qkv_bias": False, "tie_embeddings": False}
    assert (base["grad_clip"], base["weight_decay"], base["schedule"], base["precision"]) == (None, 0.1, "constant", "fp32")
    changed = {name: v["overrides"] for name, v in variants.items() if name != "baseline"}
    assert changed == {"lr_schedule": {"schedule": "cosine", "warmup_steps": 300, "model": {}},
                       "no_dropout": {"model": {"dropout": 0.0}}, "weight_decay_0_01": {"weight_decay": 0.01, "model": {}},
                       "qkv_bias": {"model": {"qkv_bias": True}}, "grad_clip": {"grad_clip": 1.0, "model": {}},
                       "mixed_precision": {"precision": "bf16", "model": {}},
                       "tied_embeddings": {"model": {"tie_embeddings": True}},
                       "no_repeated_spans": {"repeat_fraction": 0.0, "model": {}},
                       "stacked": {"schedule": "cosine", "warmup_steps": 300, "model": {"dropout": 0.0}}}
    # What the committed result shows helps beyond noise, and not weight tying (the reference: harmful).
    assert variants["stacked"]["stack"] == ["lr_schedule", "no_dropout"]
    cfg = run_config(study, "qkv_bias", 2, tmp_path)
    assert (cfg.seed, cfg.data_order_seed, cfg.model_config().n_layers) == (2, 2, 2)


@pytest.mark.parametrize("text, message", [
    ("seeds = [", "not valid TOML"),
    ("[variants.x]\nno_such_flag = 1\n", "unknown training config keys"),
    ("[variants.x]\nmodel = { no_such_field = 1 }\n", "unknown model fields"),
    ("[variants.x]\nstack = ['y']\n", "not other variants"),
    ("[baseline]\nseed = 1\n", "set by the study"),
    ("seeds = []\n", "seeds must be"),
])
def test_bad_study_files_exit_2(text, message, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert study_module.main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    with pytest.raises(StudyError):
        load_study(path)


def test_compare_runs_user_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare_runs.cli.run(compare_runs.main, [str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "notarun").mkdir()
    with pytest.raises(SystemExit):
        compare_runs.cli.run(compare_runs.main, [str(tmp_path / "notarun")])
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.parametrize("vary, seeds, orders", [("init", [3, 7], [None, None]), ("data", [0, 0], [3, 7]),
                                                  ("both", [3, 7], [3, 7])])
def test_a_study_varies_initialisation_data_order_or_both(vary, seeds, orders, tmp_path):
    study = resolve_study({"seeds": [3, 7], "vary": vary, "baseline": {"preset": "tiny"},
                           "variants": {"x": {"lr": 1e-3}}})
    for variant in ("baseline", "x"):
        configs = [run_config(study, variant, n, tmp_path) for n in (3, 7)]
        assert [c.seed for c in configs] == seeds and [c.data_order_seed for c in configs] == orders
        assert [c.out for c in configs] == [str(tmp_path / variant / f"seed_{n}") for n in (3, 7)]
    with pytest.raises(StudyError, match="vary must be"):
        resolve_study({"vary": "weights"})
    with pytest.raises(StudyError, match="data_order_seed"):
        resolve_study({"baseline": {"data_order_seed": 1}})


def planted_over_training(variant: str, seed: int) -> dict:
    """over_training.json of one run with planted values: no_dropout's in-context learning
    is far above the baseline's (beyond noise), induction scores differ by less than the
    seeds do; baseline seed 7 never forms an induction head and has no ablation."""
    bump = 1.0 if variant == "no_dropout" else 0.0
    jitter = {3: 0.01, 7: -0.02}[seed]
    rows = []
    for i, step in enumerate((0, 3, 6)):
        rows.append({"step": step, "tokens_seen": step * 64, "icl": i * (0.5 + bump) + jitter, "icl_first": 9.0,
                     "heads": {"induction": [[0.2 * i + jitter, 0.1]], "previous_token": [[0.3, 0.1 * i - jitter]],
                               "duplicate_token": [[0.0, 0.0]]},
                     "logit_lens": [7.0 - i - bump / 2 + jitter],
                     "k_composition": [[0.5]]})  # a metric this comparison does not know: ignored
        if not (variant == "baseline" and seed == 7):
            rows[-1]["ablation"] = [[0.6 + bump + jitter, 0.2 - jitter]]
    crossing = None if (variant, seed) == ("baseline", 7) else {"step": 3 + 3 * (variant == "baseline"), "tokens_seen": 64 * (3 + 3 * (variant == "baseline")), "head": [0, 0], "score": 0.6}
    return {"run_dir": "x", "metrics": ["icl", "heads", "logit_lens", "ablation"], "options": {}, "notes": [],
            "checkpoints": rows, "crossing": crossing}


@pytest.fixture(scope="module")
def planted_study(tiny_study, tmp_path_factory):
    """A copy of the tiny study whose runs' over_training.json files are planted."""
    _, original, *_ = tiny_study
    out = tmp_path_factory.mktemp("planted") / "study"
    shutil.copytree(original, out, ignore=shutil.ignore_patterns("analysis", "comparison.*"))
    files = {}
    for variant in ("baseline", "no_dropout"):
        for seed in (3, 7):
            path = out / variant / f"seed_{seed}" / "analysis" / "over_training.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(planted_over_training(variant, seed)))
            files[variant, seed] = path
    return out, files


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy, on planted differences equal across seeds
def test_learned_comparison_equals_direct_computation_from_over_training_json(planted_study):
    out, files = planted_study
    result = compare_runs.compare([out], log=lambda *a: None)  # reads the files: nothing to compute
    assert all(not (p.parent / "over_training").exists() for p in files.values())

    def direct(variant, read):
        return [read(json.loads(files[variant, s].read_text())) for s in (3, 7)]

    def top_share(d):
        effects = sorted((max(0, x) for x in d["checkpoints"][-1]["ablation"][0]), reverse=True)
        return effects[0] / sum(effects)

    readers = {
        "final_icl": lambda d: d["checkpoints"][-1]["icl"],
        "max_icl": lambda d: max(r["icl"] for r in d["checkpoints"]),
        "best_induction": lambda d: max(d["checkpoints"][-1]["heads"]["induction"][0]),
        "best_previous_token": lambda d: max(d["checkpoints"][-1]["heads"]["previous_token"][0]),
        "logit_lens_0": lambda d: d["checkpoints"][-1]["logit_lens"][0],
    }
    learned = result["learned"]
    for metric, read in readers.items():
        b, n = direct("baseline", read), direct("no_dropout", read)
        got = learned[metric]["variants"]
        assert got["baseline"]["values"] == b and got["no_dropout"]["values"] == n
        assert got["no_dropout"]["mean"] == pytest.approx(statistics.mean(n), abs=1e-12)
        assert got["no_dropout"]["std"] == pytest.approx(statistics.stdev(n), abs=1e-12)
        reference = scipy.stats.ttest_ind(n, b, equal_var=False).confidence_interval(0.95)
        w = got["no_dropout"]["welch"]
        assert (w["low"], w["high"]) == (pytest.approx(reference.low, abs=1e-9), pytest.approx(reference.high, abs=1e-9))
        ref_pair = scipy.stats.ttest_rel(n, b).confidence_interval(0.95)
        pair = got["no_dropout"]["paired"]
        assert (pair["low"], pair["high"]) == (pytest.approx(ref_pair.low, abs=1e-9), pytest.approx(ref_pair.high, abs=1e-9))
        assert w["exceeds_noise"] == (not reference.low <= 0 <= reference.high)
    assert learned["final_icl"]["variants"]["no_dropout"]["welch"]["exceeds_noise"] is True  # planted +1.0 x 2
    assert learned["best_induction"]["variants"]["no_dropout"]["welch"]["exceeds_noise"] is False
    # Missing stays missing: baseline seed 7 has no crossing and no ablation (not zeros).
    crossing = learned["crossing_step"]["variants"]
    assert crossing["baseline"]["values"] == [6.0, None] and crossing["baseline"]["n"] == 1
    assert crossing["no_dropout"]["welch"]["diff"] == pytest.approx(3.0 - 6.0) and "paired" not in crossing["no_dropout"]
    share = learned["largest_head_share"]["variants"]
    assert share["baseline"]["values"] == [top_share(json.loads(files["baseline", 3].read_text())), None]
    assert share["no_dropout"]["values"] == pytest.approx(direct("no_dropout", top_share))
    assert learned["heads_for_80pct"]["variants"]["no_dropout"]["values"] == [1.0, 1.0]  # 1.61 of 1.79 (and 1.58 of 1.80) in the largest
    assert "k_composition" not in learned
    # In words: the planted difference beyond noise, the others within it, missing ones said.
    text = compare_runs.markdown_table(result)
    assert "no_dropout: in-context learning score at the last checkpoint is higher than in baseline by 2" in text
    assert "no_dropout (best_induction)" in text.split("Within seed noise")[1]
    assert "| crossing_step | baseline | 1 of 2 | 6 ± n/a |" in text
    assert "initialisation (and dropout) seed varied; data-order seed fixed" in text
    # Curves: per metric, per variant, one series per run, from the files' rows.
    icl_curves = result["learned_curves"]["icl"]["no_dropout"]
    assert [sorted(c.items()) for c in icl_curves] == [
        [(r["step"], (r["tokens_seen"], r["icl"])) for r in json.loads(files["no_dropout", s].read_text())["checkpoints"]]
        for s in (3, 7)]


def test_compare_runs_computes_over_training_where_missing_and_says_which_noise(tiny_study):
    _, out, *_ = tiny_study
    result = compare_runs.compare([out], log=lambda *a: None)
    for variant in ("baseline", "no_dropout"):
        files = [out / variant / f"seed_{s}" / "analysis" / "over_training.json" for s in (3, 7)]
        saved = [json.loads(f.read_text()) for f in files]
        assert all("ablation" in s["metrics"] for s in saved)
        assert result["learned"]["final_icl"]["variants"][variant]["values"] == [s["checkpoints"][-1]["icl"] for s in saved]
    assert result["noise"] == {"seed": "varied", "data_order_seed": "fixed (null)"}


def test_a_failed_run_is_reported_skipped_and_marked_in_the_comparison(tiny_study, tmp_path):
    study, original, *_ = tiny_study
    out = tmp_path / "study"
    shutil.copytree(original, out, ignore=shutil.ignore_patterns("analysis", "comparison.*"))
    shutil.rmtree(out / "no_dropout" / "seed_7")
    real_train = study_module.train

    def diverge(cfg, stop_after=None):  # trains two steps, then fails as a non-finite loss does
        real_train(cfg, stop_after=2)
        raise TrainingError("the training loss is nan at step 3: stopping")

    logged = []
    mp = pytest.MonkeyPatch()
    mp.setattr(study_module, "train", diverge)
    try:
        actions = run_study(study, out, log=logged.append)
    finally:
        mp.undo()
    assert actions[-1] == ("no_dropout", 7, "failed") and [a for *_, a in actions[:-1]] == ["skipped"] * 3
    assert any("no_dropout seed 7 FAILED: the training loss is nan" in line for line in logged)
    run = out / "no_dropout" / "seed_7"
    assert rundir.run_status(run) == "failed" and "nan" in rundir.failure(run)
    # A re-run reports it and skips it (it would fail again), training nothing.
    again = run_study(study, out, log=logged.append)
    assert again[-1] == ("no_dropout", 7, "failed") and "failed before" in logged[-1]
    # The comparison leaves it out of the means, says so, and marks the variant.
    result = compare_runs.compare([out], over_training=False)
    assert result["variants"]["no_dropout"]["seeds"] == [3] and result["variants"]["no_dropout"]["planned"] == 2
    assert result["variants"]["no_dropout"]["final_val_loss"] == [final_row_val_loss(out / "no_dropout" / "seed_3")]
    [left] = result["left_out"]
    assert (left["variant"], left["run"], left["status"]) == ("no_dropout", str(run), "failed")
    assert "the training loss is nan" in left["reason"]
    text = compare_runs.markdown_table(result)
    assert "| no_dropout ⚠ fewer seeds | 1 of 2 finished |" in text
    assert f"- no_dropout: {run}: failed (failed: the training loss is nan at step 3: stopping)" in text


def test_jobs_train_side_by_side_the_same_runs_and_mark_a_failed_one(tiny_study, shakespeare_data, tmp_path):
    _, sequential, *_ = tiny_study
    text = STUDY_TOML + "\n[variants.diverges]\nlr = 1e38\n"
    study = load_study(write_study(tmp_path, shakespeare_data, text))
    logged = []
    actions = run_study(study, tmp_path / "out", jobs=2, log=logged.append)
    assert actions == [(v, s, "failed" if v == "diverges" else "trained")
                       for v in ("baseline", "no_dropout", "diverges") for s in (3, 7)]
    for variant in ("baseline", "no_dropout"):
        for seed in (3, 7):
            ours, theirs = (root / variant / f"seed_{seed}" for root in (tmp_path / "out", sequential))
            assert final_row_val_loss(ours) == pytest.approx(final_row_val_loss(theirs), rel=1e-5)
    run = tmp_path / "out" / "diverges" / "seed_3"
    assert rundir.run_status(run) == "failed" and "the training loss is" in rundir.failure(run)
    assert (tmp_path / "out" / "logs" / "diverges_seed_3.log").is_file()
    assert any("diverges seed 7 FAILED" in line for line in logged)


def test_ctrl_c_stops_side_by_side_runs_resumably_and_a_rerun_finishes_them(shakespeare_data, tmp_path):
    text = STUDY_TOML.replace("max_steps = 6", "max_steps = 300").replace("ckpt_every = 3", "ckpt_every = 100")
    path = write_study(tmp_path, shakespeare_data, text)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "training.study", str(path), "--out", str(out), "--jobs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    def steps_logged(seed):
        metrics = out / "baseline" / f"seed_{seed}" / "metrics.jsonl"
        return len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    while time.time() < deadline and not all(steps_logged(s) >= 3 for s in (3, 7)):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped before the last step" in err
    for seed in (3, 7):
        run = out / "baseline" / f"seed_{seed}"
        assert rundir.run_status(run) == "interrupted" and rundir.latest_resumable(run) is not None
    assert not (out / "no_dropout").exists(), "no run starts after the stop"
    actions = run_study(load_study(path), out, jobs=2, log=lambda *a: None)
    assert [a for *_, a in actions] == ["resumed", "resumed", "trained", "trained"]


def test_best_induction_reads_the_head_the_crossing_follows():
    from analyses import compare_learned

    deeper = {"heads": {"induction": [[0.9, 0.1], [0.3, 0.4]], "previous_token": [[0.8, 0.1], [0.2, 0.1]]}}
    assert compare_learned.best_head(deeper, "induction") == 0.4, "a layer-0 induction score is not the circuit"
    assert compare_learned.best_head(deeper, "previous_token") == 0.8
    assert compare_learned.best_head({"heads": {"induction": [[0.9, 0.1]]}}, "induction") == 0.9
    assert compare_learned.best_head({"heads": {}}, "induction") is None
