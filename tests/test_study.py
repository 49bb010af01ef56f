"""training.study and analyses.compare_runs: a 2-variant x 2-seed study on a tiny config
runs, resumes after an interruption without redoing finished runs, and the comparison
equals a direct computation from the runs' metrics files."""

import json
import math
import re
import statistics

import pytest

from analyses import compare_runs
from tests.test_analyses_browser import CHROMIUM, chromium
from training import rundir
from training import study as study_module
from training.study import StudyError, StudyInterrupted, load_study, run_study

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
def test_comparison_report_renders_in_headless_chromium(tiny_study, tmp_path):
    _, out, *_ = tiny_study
    page = compare_runs.write_report(compare_runs.compare([out]), tmp_path / "comparison.html")
    expected = page.read_text().count('class="plotly-graph-div"')
    dom = chromium(page, tmp_path, "--dump-dom")
    body = re.search(r"<body([^>]*)>", dom)
    assert body and 'data-rendered="true"' in body.group(1), dom[:2000]
    assert expected == 2 and f'data-plots="{expected}"' in body.group(1), body.group(1)
    errors = re.search(r'<pre id="report-errors">(.*?)</pre>', dom, re.S)
    assert errors is not None and errors.group(1).strip() == "", errors.group(1)


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
