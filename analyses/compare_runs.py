"""Compare training runs: which interventions really help, against seed-to-seed noise.

    python -m analyses.compare_runs runs/study-reference_interventions      # a training.study directory
    python -m analyses.compare_runs runs/a1 runs/a2 runs/b1 runs/b2 --out cmp  # run directories

Per variant: final validation loss, mean and sample standard deviation over seeds; the
difference of means from the baseline with a 95% confidence interval from Welch's t
(unequal variances), "exceeds noise" when that interval excludes 0; and, when the variant
and the baseline share seeds (same initial weights and data order), the paired difference
over those seeds with its own t interval. Written as ``comparison.md`` (also printed),
``comparison.json`` and ``comparison.html`` (the table, and loss curves with seed bands).
Which noise separates a variant's runs (initialisation seed, data-order seed) is said above
the table.

The same statistics compare what the runs learned, from each run's
``RUN/analysis/over_training.json`` (``analyses.over_training``, run with head ablation on
runs that lack it, cached): when the induction head forms, the in-context learning score
(final, largest), the best previous-token and induction scores, how concentrated the
in-context learning is over heads (head ablation), and the logit-lens loss of each layer
at the last checkpoint; a metric a run lacks is reported missing. The Markdown says in
words which differences exceed seed noise; the HTML adds curves over training per metric,
variants overlaid with seed bands.

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
from . import compare_learned as learned
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
            groups[variant] = [rundir.study_run_dir(paths[0], variant, s) for s in study["seeds"]]
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


def finished_runs(groups: dict[str, list[Path]]) -> tuple[dict[str, list[Path]], list[dict]]:
    """The finished runs of each variant (variants with none are dropped), and the runs left
    out: ``{"variant", "run", "status", "reason"}`` for each run not finished (failed, still
    interrupted, not started), so that a report can say which seeds its means lack."""
    finished, left_out = {}, []
    for name, runs in groups.items():
        for run in runs:
            status = rundir.run_status(run)
            if status == "finished" and _has_final_loss(run):
                finished.setdefault(name, []).append(run)
                continue
            reason = {"failed": f"failed: {rundir.failure(run)}", "new": "not started",
                      "interrupted": f"interrupted at step {_last_step(run)}; re-run the study to resume it",
                      "finished": "no validation loss at its last step"}[status]
            left_out.append({"variant": name, "run": str(run), "status": status, "reason": reason})
    return finished, left_out


def _has_final_loss(run: Path) -> bool:
    try:
        final_val_loss(run)
        return True
    except AnalysisError:
        return False


def _last_step(run: Path) -> int | None:
    steps = [step for step, _ in rundir.list_checkpoints(run)]
    return steps[-1] if steps else None


def seed_of(run: Path):
    """Which replicate a run is, for pairing runs across variants: ``n`` of a study's
    ``seed_<n>`` directory (the study gives every variant's run n the same seeds), else
    the run's seed, with its data-order seed when it has one."""
    if run.name.startswith("seed_") and run.name[5:].isdigit() and rundir.read_study(run.parent.parent) is not None:
        return int(run.name[5:])
    config = rundir.read_config(run)
    order = config.get("data_order_seed")
    return config["seed"] if order is None else f"seed {config['seed']}, data order {order}"


def noise(groups: dict[str, list[Path]]) -> dict[str, str]:
    """For each replicate field (initialisation seed, data-order seed): ``varied`` when it
    differs between the runs of some variant, else ``fixed`` (with its value)."""
    out = {}
    for name in fields_with_roles("replicate"):
        values = {v: {json.dumps(rundir.read_config(r).get(name)) for r in runs} for v, runs in groups.items()}
        varied = any(len(vals) > 1 for vals in values.values())
        every = sorted({x for vals in values.values() for x in vals})
        out[name] = "varied" if varied else f"fixed ({', '.join(every)})"
    return out


def summarise(values: dict[str, list], seeds: dict[str, list], baseline: str) -> dict[str, dict]:
    """Per variant, over its runs' values (None = missing, left out): the values, how many
    there are, mean, sample std, and against the baseline the Welch difference of means
    and, over the seeds both have, the paired difference."""
    out = {}
    base = {s: x for s, x in zip(seeds[baseline], values[baseline]) if x is not None}
    for name, vals in values.items():
        present = {s: x for s, x in zip(seeds[name], vals) if x is not None}
        xs = list(present.values())
        entry = {"values": vals, "n": len(xs), "mean": statistics.fmean(xs) if xs else None,
                 "std": statistics.stdev(xs) if len(xs) > 1 else None}
        if name != baseline and xs and base:
            entry["welch"] = welch(xs, list(base.values()))
            common = [s for s in present if s in base]
            if len(common) >= 2:
                entry["paired"] = paired([present[s] for s in common], [base[s] for s in common])
        out[name] = entry
    return out


def compare(paths: list[str | Path], over_training: bool = True, compute: bool = True, log=print) -> dict:
    """The comparison of the runs (a study directory, or run directories; the first variant
    is the baseline): ``{"baseline", "noise", "variants": {name: {"runs", "seeds",
    "final_val_loss", "mean", "std", "welch", "paired", "stack"}}, "learned": {metric:
    {"label", "variants": {name: {"values", "n", "mean", "std", "welch", "paired"}}}}}``.

    ``learned`` compares what the runs learned, from each run's over_training.json
    (computed where missing when ``compute``; see ``analyses.compare_learned``).

    >>> compare(["runs/study-reference_interventions"])["variants"]["no_dropout"]["welch"]  # doctest: +SKIP
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_dir():
            raise AnalysisError(f"{path} does not exist")
    planned, stacks = group_runs(paths)
    groups, left_out = finished_runs(planned)
    baseline = next(iter(planned))
    if baseline not in groups:
        raise AnalysisError(f"the baseline {baseline!r} has no finished run: finish it (python -m training.study "
                            "resumes a study) before comparing against it")
    seeds = {name: [seed_of(r) for r in runs] for name, runs in groups.items()}
    losses = {name: [final_val_loss(r) for r in runs] for name, runs in groups.items()}
    variants = {}
    for name, summary in summarise(losses, seeds, baseline).items():
        variants[name] = {"runs": [str(r) for r in groups[name]], "seeds": seeds[name], "planned": len(planned[name]),
                          "final_val_loss": losses[name],
                          "mean": summary["mean"], "std": summary["std"], "stack": stacks.get(name, []),
                          **{k: summary[k] for k in ("welch", "paired") if k in summary}}
    result = {"baseline": baseline, "level": LEVEL, "noise": noise(groups), "variants": variants, "left_out": left_out}
    if over_training:
        results = {name: [learned.load_over_training(r, compute, log) for r in runs] for name, runs in groups.items()}
        per_run = {name: [learned.run_values(r) for r in rs] for name, rs in results.items()}
        names = list(dict.fromkeys(k for runs in per_run.values() for values in runs for k in values))
        result["learned"] = {
            metric: {"label": learned.label(metric),
                     "variants": summarise({v: [r.get(metric) for r in runs] for v, runs in per_run.items()}, seeds, baseline)}
            for metric in names}
        result["learned_curves"] = {
            metric: {v: [learned.curve(r, metric) for r in rs] for v, rs in results.items()} for metric in learned.CURVES}
    return result


def markdown_table(result: dict) -> str:
    pct = round(100 * result["level"])
    lines = [noise_text(result) + "\n",
             f"| variant | seeds | final val loss (mean ± std) | Δ vs {result['baseline']} [{pct}% CI, Welch] | "
             f"exceeds noise | paired Δ [{pct}% CI] |", "|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        label = variant_label(name, v)
        std = "n/a" if v["std"] is None else f"{v['std']:.4f}"
        row = [label, seeds_text(v), f"{v['mean']:.4f} ± {std}"]
        if name == result["baseline"]:
            row += ["(baseline)", "", ""]
        else:
            w = v["welch"]
            row += [_interval(w), _yes_no(w["exceeds_noise"]), _interval(v["paired"]) if "paired" in v else "n/a"]
        lines.append("| " + " | ".join(row) + " |")
    if result.get("left_out"):
        lines += ["", left_out_text(result)]
    if "learned" in result:
        lines += ["", learned_table(result), learned_in_words(result)]
    return "\n".join(lines) + "\n"


def variant_label(name: str, v: dict) -> str:
    label = f"{name} (stacked: {' + '.join(v['stack'])})" if v["stack"] else name
    return label if len(v["seeds"]) == v.get("planned", len(v["seeds"])) else f"{label} ⚠ fewer seeds"


def seeds_text(v: dict) -> str:
    planned = v.get("planned", len(v["seeds"]))
    return str(planned) if len(v["seeds"]) == planned else f"{len(v['seeds'])} of {planned} finished"


def left_out_text(result: dict) -> str:
    """The runs not in the means, each with why: failed runs are reported, never dropped silently."""
    lines = ["Runs left out of the means (⚠ marks variants with fewer finished seeds):", ""]
    lines += [f"- {r['variant']}: {r['run']}: {r['status']} ({r['reason']})" for r in result["left_out"]]
    missing = sorted({r["variant"] for r in result["left_out"]} - set(result["variants"]))
    if missing:
        lines += ["", f"Variants with no finished run, not compared: {', '.join(missing)}."]
    return "\n".join(lines)


def noise_text(result: dict) -> str:
    n = result["noise"]
    return (f"Noise between the runs of a variant: initialisation (and dropout) seed {n['seed']}; "
            f"data-order seed {n['data_order_seed'].replace('null', 'none: the stream in order')}.")


def learned_table(result: dict) -> str:
    pct = round(100 * result["level"])
    lines = ["What the models learned (from each run's over_training.json; n = runs with a value):", "",
             f"| metric | variant | n | mean ± std | Δ vs {result['baseline']} [{pct}% CI, Welch] | exceeds noise | "
             f"paired Δ [{pct}% CI] |", "|---|---|---|---|---|---|---|"]
    for metric, m in result["learned"].items():
        for name, v in m["variants"].items():
            total = len(v["values"])
            std = "n/a" if v["std"] is None else f"{v['std']:.3g}"
            mean = "missing" if v["mean"] is None else f"{v['mean']:.4g} ± {std}"
            row = [metric, name, f"{v['n']} of {total}", mean]
            if name == result["baseline"]:
                row += ["(baseline)", "", ""]
            elif "welch" not in v:
                row += ["missing", "n/a", "n/a"]
            else:
                row += [_interval(v["welch"]), _yes_no(v["welch"]["exceeds_noise"]),
                        _interval(v["paired"]) if "paired" in v else "n/a"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def learned_in_words(result: dict) -> str:
    """Which differences in what the models learned exceed seed noise, in sentences."""
    pct = round(100 * result["level"])
    beyond, within, missing = [], [], []
    for metric, m in result["learned"].items():
        for name, v in m["variants"].items():
            if name == result["baseline"]:
                continue
            w = v.get("welch")
            if w is None:
                missing.append(f"{name}: {m['label']}")
            elif w["exceeds_noise"]:
                word = "higher" if w["diff"] > 0 else "lower"
                beyond.append(f"- {name}: {m['label']} is {word} than in {result['baseline']} by {abs(w['diff']):.4g} "
                              f"({pct}% CI of the difference {w['low']:+.4g} to {w['high']:+.4g}): beyond seed noise.")
            else:
                within.append(f"{name} ({metric})")
    lines = ["Differences beyond seed noise:", ""] + (beyond or ["- none."])
    lines += ["", "Within seed noise (or too few seeds to tell): " + (", ".join(within) if within else "none") + "."]
    if missing:
        lines += ["", "Missing (not in the runs' over_training.json, or an induction head that never formed): "
                  + "; ".join(missing) + "."]
    return "\n".join(lines)


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
                  "The paired difference uses the seeds a variant shares with the baseline. " + noise_text(result))
    header = ["variant", "seeds", "mean", "std", "Δ vs baseline", "CI low", "CI high", "exceeds noise", "paired Δ", "paired CI"]
    rows = []
    for name, v in result["variants"].items():
        w, pr = v.get("welch"), v.get("paired")
        rows.append([variant_label(name, v), seeds_text(v), v["mean"], _na(v["std"]), _na(w and w["diff"]), _na(w and w["low"]),
                     _na(w and w["high"]), _yes_no(w["exceeds_noise"]) if w else "(baseline)", _na(pr and pr["diff"]),
                     f"[{pr['low']:+.4f}, {pr['high']:+.4f}]" if pr and pr["low"] is not None else "n/a"])
    page.add_table(header, rows)
    if result.get("left_out"):
        add_lines(page, left_out_text(result))
    for key, title in (("val_loss", "Validation loss"), ("train_loss", "Training loss")):
        page.add_heading(title)
        series = {name: [{row["step"]: (row["tokens_seen"], row[key]) for row in read_metrics(Path(r))
                          if row.get(key) is not None} for r in v["runs"]] for name, v in result["variants"].items()}
        page.add_plotly(band_figure(series, title, "loss"))
    if "learned" in result:
        page.add_heading("What the models learned")
        add_lines(page, learned_in_words(result))
        rows = []
        for metric, m in result["learned"].items():
            for name, v in m["variants"].items():
                w, pr = v.get("welch"), v.get("paired")
                rows.append([metric, name, f"{v['n']} of {len(v['values'])}", _na(v["mean"]), _na(v["std"]),
                             _na(w and w["diff"]), _na(w and w["low"]), _na(w and w["high"]),
                             "(baseline)" if name == result["baseline"] else _yes_no(w and w["exceeds_noise"]),
                             _na(pr and pr["diff"])])
        page.add_table(["metric", "variant", "n", "mean", "std", "Δ vs baseline", "CI low", "CI high", "exceeds noise",
                        "paired Δ"], rows)
        for metric, series in result["learned_curves"].items():
            title = learned.CURVES[metric][0]
            page.add_heading(title)
            page.add_plotly(band_figure({v: [{int(k): tuple(x) for k, x in run.items()} for run in runs]
                                         for v, runs in series.items()}, title, metric))
    return page.save(out)


def add_lines(page: Page, text: str) -> None:
    for line in text.splitlines():
        if line.strip():
            page.add_text(line)


def band_figure(series: dict[str, list[dict[int, tuple]]], title: str, ylabel: str) -> go.Figure:
    """Per variant, the mean over its runs with a band from the lowest to the highest run,
    at the steps every run has; ``series[variant][run][step] = (tokens seen, value)``. Runs
    without the metric are left out of their variant's curve, and its legend says so."""
    fig = go.Figure()
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    for i, (name, all_runs) in enumerate(series.items()):
        runs = [run for run in all_runs if run]
        if len(runs) < len(all_runs):
            name = f"{name} ({len(runs)} of {len(all_runs)} runs have it)"
        steps = sorted(set.intersection(*(set(run) for run in runs))) if runs else []
        x = [runs[0][s][0] for s in steps]
        values = [[run[s][1] for run in runs] for s in steps]
        color = colors[i % len(colors)]
        low, high = [min(v) for v in values], [max(v) for v in values]
        fig.add_trace(go.Scatter(x=x + x[::-1], y=high + low[::-1], fill="toself", line={"width": 0}, opacity=0.2,
                                 fillcolor=color, hoverinfo="skip", showlegend=False, legendgroup=name))
        fig.add_trace(go.Scatter(x=x, y=[statistics.fmean(v) for v in values], mode="lines", name=name,
                                 line={"color": color}, legendgroup=name))
    fig.update_layout(title=f"{title}: mean over seeds, band from lowest to highest seed", xaxis_title="tokens seen",
                      yaxis_title=ylabel, height=500)
    return fig


def _na(value):
    return "n/a" if value is None else value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analyses.compare_runs",
                                description="Final validation loss and what the models learned (over_training) per variant "
                                            "over seeds, differences from the baseline with confidence intervals, and "
                                            "curves with seed bands.")
    p.add_argument("runs", nargs="+", help="a study directory (from training.study), or run directories (baseline first)")
    p.add_argument("--out", default=None, help="directory for comparison.md/.json/.html "
                                               "(default: the study directory, else ./comparison)")
    p.add_argument("--over-training", default="compute", choices=["compute", "read", "off"],
                   help="what the models learned: compute over_training.json where missing (default), only read "
                        "what is there, or compare losses only")
    args = p.parse_args(argv)
    result = compare(args.runs, over_training=args.over_training != "off", compute=args.over_training == "compute")
    is_study = len(args.runs) == 1 and rundir.read_study(args.runs[0]) is not None
    out = cli.out_dir(args.out or (args.runs[0] if is_study else "comparison"))
    table = markdown_table(result)
    atomic_write(out / "comparison.md", table)
    print(table)
    print(f"wrote {out / 'comparison.md'}")
    return cli.finish(out, functools.partial(write_report, result), result, html="comparison.html", data="comparison.json")


if __name__ == "__main__":
    cli.run(main)
