"""Compare training runs: which interventions really help, against seed-to-seed noise.

    python -m analyses.compare_runs runs/study-reference_interventions      # a training.study directory
    python -m analyses.compare_runs runs/a1 runs/a2 runs/b1 runs/b2 --out cmp  # run directories

Per variant: final validation loss, mean and sample standard deviation over seeds; the
difference of means from the baseline with a 95% confidence interval from Welch's t
(unequal variances), "exceeds noise" when that interval excludes 0; and, when the variant
and the baseline share seeds (same initial weights and data order), the paired difference
over those seeds with its own t interval. Written as ``comparison.md`` (also printed),
``comparison.json`` and ``comparison.html`` (the table, and loss curves with seed bands).

Given run directories, runs whose configs agree in the fields that describe the experiment
(``training.config.ROLES``: not the seed, hardware or bookkeeping) are one variant, named by
their parent directory when the runs are ``.../<variant>/seed_<n>``; the first is the baseline.
"""

import argparse
import functools
import json
import math
import statistics
from pathlib import Path

import plotly.graph_objects as go
import scipy.stats

from hooked_gpt2.atomic import atomic_write
from training import rundir
from training.config import EXPERIMENT_ROLES, fields_with_roles

from . import cli
from .common import AnalysisError
from .html import Page

LEVEL = 0.95


# Statistics.
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (fractional for Welch).

    >>> round(t_quantile(0.975, 1), 3), round(t_quantile(0.975, 10), 3)
    (12.706, 2.228)
    """
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    return float(scipy.stats.t.ppf(p, df))


def welch(a: list[float], b: list[float], level: float = LEVEL) -> dict:
    """Difference of means ``mean(a) - mean(b)`` with Welch's t confidence interval."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "low": None, "high": None, "df": None, "exceeds_noise": None}
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # identical runs within each group: no noise to compare against
        return {"diff": diff, "low": diff, "high": diff, "df": None, "exceeds_noise": diff != 0}
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(0.5 + level / 2, df) * se
    return {"diff": diff, "low": diff - half, "high": diff + half, "df": df, "exceeds_noise": not diff - half <= 0 <= diff + half}


def paired(a: list[float], b: list[float], level: float = LEVEL) -> dict:
    """Mean of the per-seed differences ``a_i - b_i`` with a t interval (n - 1 df)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"diff": mean, "low": None, "high": None, "n": len(diffs), "exceeds_noise": None}
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    half = t_quantile(0.5 + level / 2, len(diffs) - 1) * se
    return {"diff": mean, "low": mean - half, "high": mean + half, "n": len(diffs),
            "exceeds_noise": not mean - half <= 0 <= mean + half}


# Reading runs.
def read_metrics(run: Path) -> list[dict]:
    if not rundir.has_metrics(run):
        raise AnalysisError(f"{run} has no metrics.jsonl: is it a training run directory?")
    return rundir.read_metrics(run)


def final_val_loss(run: Path) -> float:
    """The validation loss logged at the run's last step (``config.json``'s max_steps)."""
    max_steps = rundir.read_config(run)["max_steps"]
    for row in read_metrics(run):
        if row["step"] == max_steps and row.get("val_loss") is not None:
            return row["val_loss"]
    raise AnalysisError(f"{run} has no validation loss at its last step {max_steps}: it has not finished; "
                        "finish it (python -m training.study resumes it) or leave it out")


def group_runs(paths: list[Path]) -> tuple[dict[str, list[Path]], dict[str, list[str]]]:
    """Variants (name -> runs, the baseline first) from a study directory or run directories.

    Run directories are one variant when their configs agree in every field the config
    declares part of the experiment (``training.config.EXPERIMENT_ROLES``).
    """
    study = rundir.read_study(paths[0]) if len(paths) == 1 else None
    if study is not None:
        groups = {}
        for variant in study["variants"]:
            runs = [rundir.study_run_dir(paths[0], variant, s) for s in study["seeds"]]
            groups[variant] = [r for r in runs if rundir.has_config(r)]
            if not groups[variant]:
                raise AnalysisError(f"variant {variant!r} of {paths[0]} has no runs yet: run the study first")
        return groups, {v: spec.get("stack", []) for v, spec in study["variants"].items()}
    groups: dict[str, list[Path]] = {}
    keys: dict[str, str] = {}
    experiment = fields_with_roles(*EXPERIMENT_ROLES)
    for path in paths:
        if not rundir.has_config(path):
            raise AnalysisError(f"{path} is not a run directory (no config.json) nor a study directory (no study.json)")
        config = rundir.read_config(path)
        key = json.dumps({k: config.get(k) for k in experiment}, sort_keys=True)
        if key not in keys:
            name = path.parent.name if path.name.startswith("seed_") else path.name
            while name in groups:
                name += "'"
            keys[key] = name
            groups[name] = []
        groups[keys[key]].append(path)
    return groups, {}


def seed_of(run: Path) -> int:
    return rundir.read_config(run)["seed"]


def compare(paths: list[str | Path]) -> dict:
    """The comparison of the runs (a study directory, or run directories; the first variant
    is the baseline): ``{"baseline", "variants": {name: {"seeds", "final_val_loss", "mean",
    "std", "welch", "paired", "stack"}}}``.

    >>> compare(["runs/study-reference_interventions"])["variants"]["no_dropout"]["welch"]  # doctest: +SKIP
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_dir():
            raise AnalysisError(f"{path} does not exist")
    groups, stacks = group_runs(paths)
    variants = {}
    for name, runs in groups.items():
        losses = [final_val_loss(r) for r in runs]
        variants[name] = {"runs": [str(r) for r in runs], "seeds": [seed_of(r) for r in runs], "final_val_loss": losses,
                          "mean": statistics.fmean(losses), "std": statistics.stdev(losses) if len(losses) > 1 else None,
                          "stack": stacks.get(name, [])}
    baseline = next(iter(variants))
    base = variants[baseline]
    for name, v in variants.items():
        if name == baseline:
            continue
        v["welch"] = welch(v["final_val_loss"], base["final_val_loss"])
        common = [s for s in v["seeds"] if s in base["seeds"]]
        if len(common) >= 2:
            mine = dict(zip(v["seeds"], v["final_val_loss"]))
            theirs = dict(zip(base["seeds"], base["final_val_loss"]))
            v["paired"] = paired([mine[s] for s in common], [theirs[s] for s in common])
    return {"baseline": baseline, "level": LEVEL, "variants": variants}


def markdown_table(result: dict) -> str:
    pct = round(100 * result["level"])
    lines = [f"| variant | seeds | final val loss (mean ± std) | Δ vs {result['baseline']} [{pct}% CI, Welch] | "
             f"exceeds noise | paired Δ [{pct}% CI] |", "|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        label = f"{name} (stacked: {' + '.join(v['stack'])})" if v["stack"] else name
        std = "n/a" if v["std"] is None else f"{v['std']:.4f}"
        row = [label, str(len(v["seeds"])), f"{v['mean']:.4f} ± {std}"]
        if name == result["baseline"]:
            row += ["(baseline)", "", ""]
        else:
            w = v["welch"]
            row += [_interval(w), _yes_no(w["exceeds_noise"]), _interval(v["paired"]) if "paired" in v else "n/a"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _interval(d: dict) -> str:
    if d["low"] is None:
        return f"{d['diff']:+.4f} [n/a: one seed]"
    return f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def _yes_no(value) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


def write_report(result: dict, out: Path) -> Path:
    page = Page("Comparison of runs")
    page.add_text(f"Final validation loss over seeds. Differences are variant minus {result['baseline']} (negative: "
                  f"the intervention lowers the loss); the interval is a {round(100 * result['level'])}% confidence "
                  "interval from Welch's t, and a difference exceeds seed-to-seed noise when it excludes 0. "
                  "The paired difference uses the seeds a variant shares with the baseline.")
    header = ["variant", "seeds", "mean", "std", "Δ vs baseline", "CI low", "CI high", "exceeds noise", "paired Δ", "paired CI"]
    rows = []
    for name, v in result["variants"].items():
        label = f"{name} (stacked: {' + '.join(v['stack'])})" if v["stack"] else name
        w, pr = v.get("welch"), v.get("paired")
        rows.append([label, len(v["seeds"]), v["mean"], _na(v["std"]), _na(w and w["diff"]), _na(w and w["low"]),
                     _na(w and w["high"]), _yes_no(w["exceeds_noise"]) if w else "(baseline)", _na(pr and pr["diff"]),
                     f"[{pr['low']:+.4f}, {pr['high']:+.4f}]" if pr and pr["low"] is not None else "n/a"])
    page.add_table(header, rows)
    for key, title in (("val_loss", "Validation loss"), ("train_loss", "Training loss")):
        page.add_heading(title)
        page.add_plotly(curves(result, key, title))
    return page.save(out)


def curves(result: dict, key: str, title: str) -> go.Figure:
    """Mean over seeds per variant, with a band from the lowest to the highest seed."""
    fig = go.Figure()
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    for i, (name, v) in enumerate(result["variants"].items()):
        by_step: dict[int, list[float]] = {}
        tokens = {}
        for run in v["runs"]:
            for row in read_metrics(Path(run)):
                if row.get(key) is not None:
                    by_step.setdefault(row["step"], []).append(row[key])
                    tokens[row["step"]] = row["tokens_seen"]
        steps = sorted(s for s, values in by_step.items() if len(values) == len(v["runs"]))
        x = [tokens[s] for s in steps]
        color = colors[i % len(colors)]
        low, high = [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps]
        fig.add_trace(go.Scatter(x=x + x[::-1], y=high + low[::-1], fill="toself", line={"width": 0}, opacity=0.2,
                                 fillcolor=color, hoverinfo="skip", showlegend=False, legendgroup=name))
        fig.add_trace(go.Scatter(x=x, y=[statistics.fmean(by_step[s]) for s in steps], mode="lines", name=name,
                                 line={"color": color}, legendgroup=name))
    fig.update_layout(title=f"{title}: mean over seeds, band from lowest to highest seed", xaxis_title="tokens seen",
                      yaxis_title="loss", height=500)
    return fig


def _na(value):
    return "n/a" if value is None else value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analyses.compare_runs",
                                description="Final validation loss per variant over seeds, differences from the baseline "
                                            "with confidence intervals, and loss curves with seed bands.")
    p.add_argument("runs", nargs="+", help="a study directory (from training.study), or run directories (baseline first)")
    p.add_argument("--out", default=None, help="directory for comparison.md/.json/.html "
                                               "(default: the study directory, else ./comparison)")
    args = p.parse_args(argv)
    result = compare(args.runs)
    is_study = len(args.runs) == 1 and rundir.read_study(args.runs[0]) is not None
    out = cli.out_dir(args.out or (args.runs[0] if is_study else "comparison"))
    table = markdown_table(result)
    atomic_write(out / "comparison.md", table)
    print(table)
    print(f"wrote {out / 'comparison.md'}")
    return cli.finish(out, functools.partial(write_report, result), result, html="comparison.html", data="comparison.json")


if __name__ == "__main__":
    cli.run(main)
