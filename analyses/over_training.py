"""How a model forms over training: the analyses, computed for every checkpoint of a run.

For each ``RUN/checkpoints/step_*`` in step order:

- ``val_loss``: validation loss on the run's own fixed batches (rebuilt from
  ``RUN/config.json``, at the run's precision), beside the loss the run logged there;
- ``icl``: on repeated random tokens ``[BOS, r_1..r_n, r_1..r_n]``, mean loss on the
  first repetition's tokens minus mean loss on the second's (positive: learned in context).
  The random tokens are the run's most frequent training tokens (``--probe-top``), or
  every token id for a run without data;
- ``icl_text``: Olsson et al.'s score on the run's validation text, loss late in the
  context minus loss early in it (negative: learned in context; ``analyses.formation``);
- ``composition``: K-composition of every layer-0 head with every layer-1 head;
- ``heads``: induction, previous-token and duplicate-token scores of every head, on the
  same repeated tokens;
- ``logit_lens``: next-token loss read off each layer's residual stream, on the first
  validation batch (on the repeated tokens for a run without data);
- ``ablation`` (on request): the change in loss on the second repetition when each head
  is mean-ablated (which heads in-context learning depends on).

With head scores, ``results["formation"]`` says when each head's previous-token and
induction scores first reach 0.5, which layer-0 head the best induction head composes
with, and holds that head's attention on a repeated sequence before, during and after
it formed, with the validation loss at those checkpoints and how far the last one is above
its lowest after the crossing (``loss``: Olsson et al. see the loss fall at the phase
change); the report marks the crossings on every plot.

Each checkpoint's results are cached in ``RUN/analysis/over_training/step_XXXXXXX.json``,
each metric under a hash of its options: a re-run computes only what it has not seen
(new checkpoints, changed options), so it can follow a run that is still training.

    python -m analyses.over_training runs/demo                 # writes runs/demo/analysis/
    python -m analyses.over_training runs/demo --metrics icl,heads,ablation

>>> results = over_training("runs/demo")                                  # doctest: +SKIP
>>> results["crossing"]  # first checkpoint whose best induction score >= 0.5, or None  # doctest: +SKIP
"""

import argparse
import functools
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch

from hooked_gpt2 import CheckpointError, HookedGPT2
from hooked_gpt2.atomic import atomic_write
from hooked_gpt2.device import resolve_device
from hooked_gpt2.losses import next_token_loss
from training import rundir
from training.evaluate import evaluate, fixed_val_batches
from training.precision import make_autocast

from . import cli
from .ablation import head_ablation
from .common import AnalysisError
from .formation import (Probes, attention_views, best_head, best_induction_head, earliest, first_crossings,
                        k_composition, loss_around, text_icl, view_steps)
from .heads import DETECTORS, repeated_random_tokens, scores_from_patterns
from .html import Page, heatmap
from .logit_lens import per_layer_loss

METRICS = ("val_loss", "icl", "heads", "logit_lens", "ablation", "icl_text", "composition")
DEFAULT_METRICS = ("val_loss", "icl", "heads", "logit_lens", "icl_text", "composition")
CROSSING = 0.5  # the induction score at which we say an induction head has formed


def over_training(run_dir, metrics=None, *, icl_seq_len: int = 20, icl_batch: int = 8, seed: int = 0,
                  ablation_method: str = "mean", probe_top: int | None = None, device: str = "auto", log=print) -> dict:
    """Every requested metric for every checkpoint of ``run_dir`` (cached per checkpoint).

    Returns ``{"run_dir", "metrics", "options", "notes", "checkpoints": [{"step",
    "tokens_seen", "val_loss", "logged_val_loss", "icl", "heads", "logit_lens",
    "ablation", "icl_text", "composition"}], "crossing", "formation"}``; per-head values are
    ``[layer][head]`` lists. ``probe_top``: draw the random probe tokens from the run's
    ``probe_top`` most frequent training tokens (0 or a run without data: every id; None:
    the tokens its repeated spans were drawn from, ``repeat_vocab``, for a run trained with
    ``--repeat-fraction``, else 1,000).

    >>> results = over_training("runs/demo", metrics=["icl", "heads"])  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    metrics = list(DEFAULT_METRICS if metrics is None else metrics)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise AnalysisError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    if not run_dir.is_dir():
        raise AnalysisError(f"run directory {run_dir} does not exist")
    checkpoints = rundir.list_checkpoints(run_dir)
    if not checkpoints:
        raise AnalysisError(f"{run_dir} has no checkpoints (no {run_dir}/checkpoints/step_*): train first, "
                            "or wait for the run's first checkpoint")
    config = rundir.read_config(run_dir) if rundir.has_config(run_dir) else {}
    device = resolve_device(device)
    logged = logged_val_losses(run_dir)
    if probe_top is None:
        probe_top = default_probe_top(config)
    options = {"icl_seq_len": icl_seq_len, "icl_batch": icl_batch, "seed": seed, "ablation_method": ablation_method,
               "probe_top": probe_top}
    val = ValidationData(config, device, probe_top)
    options["probe_tokens"] = val.probes.description
    notes = [] if val.batches is not None or "val_loss" not in metrics else [val.why_missing]
    if "icl_text" in metrics and val.probes.windows is None:
        notes.append("natural-text in-context learning skipped: the run's validation split is not available")
    cache_dir = run_dir / rundir.ANALYSIS / "over_training"
    cache_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for step, path in checkpoints:
        cache_path = cache_dir / f"{path.name}.json"
        cached = _read_json(cache_path) or {}
        identity = _checkpoint_identity(path)
        if cached.get("checkpoint") != identity:  # rewritten (e.g. a run restarted with --overwrite)
            cached = {}
        done = cached.get("metrics", {})  # "name@options-hash" -> value; other options' results stay
        keys = {m: f"{m}@{_key(m, options, val, device)}" for m in metrics}
        todo = [m for m in metrics if keys[m] not in done]
        if todo:
            log(f"step {step}: computing {', '.join(todo)}")
            model = _load(path, device)
            values = compute(model, todo, options, val)
            for name in todo:
                done[keys[name]] = values[name]
            info = rundir.read_checkpoint_info(path)
            cached = {"step": step, "tokens_seen": info.get("tokens_seen"), "checkpoint": identity, "metrics": done}
            atomic_write(cache_path, json.dumps(cached) + "\n")
        row = {"step": step, "tokens_seen": cached.get("tokens_seen")}
        if row["tokens_seen"] is None:
            row["tokens_seen"] = step * config.get("global_batch_tokens", 1)
        for name in metrics:
            value = done[keys[name]]
            if name in ("icl", "icl_text"):  # icl, icl_first, icl_second; icl_text, its ends and positions
                row.update(value)
            else:
                row[name] = value
        if "val_loss" in metrics:
            row["logged_val_loss"] = logged.get(step)
        rows.append(row)

    results = {"run_dir": str(run_dir), "metrics": metrics, "options": options, "notes": notes,
               "checkpoints": rows, "crossing": induction_crossing(rows) if "heads" in metrics else None}
    if "heads" in metrics:
        results["formation"] = formation(rows, dict(checkpoints), options, val.probes, device)
    return results


def default_probe_top(config: dict) -> int:
    """How many of the run's most frequent training tokens the probes draw from: the ones
    its repeated spans were made of when it trained on them, else 1,000."""
    if config.get("repeat_fraction"):
        return int(config["repeat_vocab"])
    return 1000


class ValidationData:
    """The run's fixed validation batches, or why there are none (a run without data), the
    autocast of the run's precision on the device the analysis runs on, and the probes drawn
    from the run's ``probe_top`` most frequent training tokens."""

    def __init__(self, config: dict, device: torch.device, probe_top: int = 1000):
        self.batches, self.autocast, self.why_missing, self.identity = None, None, None, None
        self.probes = Probes(config, top=probe_top)
        data = config.get("data")
        if not data or not (Path(data) / "manifest.json").is_file():
            self.why_missing = (f"validation loss skipped: the run's data ({data or 'none in config.json'}) is not "
                                "available; the logit lens reads the repeated random tokens instead")
            return
        args = (data, config["eval_batch_size"], config["seq_len"], config["eval_batches"])
        self.batches = fixed_val_batches(*args)
        self.autocast = make_autocast(config.get("precision", "fp32"), device)
        self.identity = [*args, config.get("precision", "fp32")]


def compute(model, names, options: dict, val: ValidationData) -> dict:
    """The metrics ``names`` of one model, as JSON-ready values."""
    out = {}
    tokens = probe_tokens(model, options, val.probes)
    n = (tokens.shape[1] - 1) // 2
    second = slice(n + 1, 2 * n + 1)  # target positions of the second repetition
    with torch.no_grad():
        if "icl" in names or "heads" in names:
            logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
            losses = next_token_loss(logits, tokens, per_token=True)  # [batch, target position - 1]
            first_loss, second_loss = losses[:, :n].mean().item(), losses[:, n:].mean().item()
            out["icl"] = {"icl_first": first_loss, "icl_second": second_loss, "icl": first_loss - second_loss}
            patterns = torch.stack([cache["pattern", layer] for layer in range(model.cfg.n_layers)])
            out["heads"] = {k: v.tolist() for k, v in scores_from_patterns(patterns, tokens).items()}
        if "val_loss" in names:
            if val.batches is None:
                out["val_loss"] = None
            else:
                out["val_loss"] = evaluate(model, val.batches, val.autocast)
        if "logit_lens" in names:
            lens_tokens = tokens if val.batches is None else val.batches[0][:, : model.cfg.n_ctx]
            out["logit_lens"] = per_layer_loss(model, lens_tokens).tolist()
        if "icl_text" in names:
            out["icl_text"] = text_icl(model, val.probes.windows) if val.probes.windows is not None else {"icl_text": None}
        if "composition" in names:
            out["composition"] = k_composition(model).tolist() if model.cfg.n_layers >= 2 else None
        if "ablation" in names:

            def second_repetition_loss(logits):
                return next_token_loss(logits[:, second.start - 1 : second.stop - 1], tokens[:, second.start - 1 : second.stop])

            result = head_ablation(model, tokens, options["ablation_method"], metric=second_repetition_loss,
                                   seed=options["seed"], include_mlps=False)
            out["ablation"] = result.heads.tolist()
    return out


def probe_tokens(model, options: dict, probes: Probes):
    """The repeated random tokens every checkpoint is probed with (the same for all)."""
    n_vocab = model.cfg.d_vocab - 2 if probes.vocab is None else len(probes.vocab) - 1
    n = min(options["icl_seq_len"], (model.cfg.n_ctx - 1) // 2, n_vocab)
    return repeated_random_tokens(model, seq_len=n, batch=options["icl_batch"], seed=options["seed"], vocab=probes.vocab)


def induction_crossing(rows: list[dict], threshold: float = CROSSING) -> dict | None:
    """The first checkpoint whose best induction head (``best_induction_head``: layer 1 on
    in a deeper model) scores at least ``threshold``."""
    for row in rows:
        layer, head = best_induction_head(row)
        score = row["heads"]["induction"][layer][head]
        if score >= threshold:
            return {"step": row["step"], "tokens_seen": row["tokens_seen"], "head": [layer, head], "score": score}
    return None


def formation(rows: list[dict], checkpoints: dict[int, Path], options: dict, probes: Probes, device: str) -> dict:
    """When each head's previous-token and induction scores first reach ``CROSSING``; the
    best induction head at the last checkpoint, the layer-0 previous-token head its keys
    read (for K-composition), and its attention before, during and after it formed."""
    last = rows[-1]
    head = best_induction_head(last)
    source = best_head(last, "previous_token", layer=head[0] - 1) if head[0] >= 1 else None
    steps = view_steps(rows, head, CROSSING)
    model = _load(checkpoints[steps[-1][1]], device)
    tokens = probe_tokens(model, options, probes)[:1]
    patterns = attention_views(checkpoints, [step for _, step in steps], head, tokens, lambda p: _load(p, device))
    by_step = {r["step"]: r for r in rows}
    views = [{"label": label, "step": step, "pattern": pattern.tolist(), "icl": by_step[step].get("icl"),
              "icl_text": by_step[step].get("icl_text"),
              "induction": by_step[step]["heads"]["induction"][head[0]][head[1]]}
             for (label, step), pattern in zip(steps, patterns)]
    return {"previous_token_crossings": first_crossings(rows, "previous_token", CROSSING),
            "induction_crossings": first_crossings(rows, "induction", CROSSING),
            "induction_head": list(head), "previous_token_head": None if source is None else list(source),
            "view_tokens": model.to_str_tokens(tokens[0]), "views": views, "loss": loss_around(rows, dict(steps))}


def logged_val_losses(run_dir: Path) -> dict[int, float]:
    """step -> the val_loss the run logged."""
    return {row["step"]: row["val_loss"] for row in rundir.read_metrics(run_dir) if row.get("val_loss") is not None}


def _key(metric: str, options: dict, val: ValidationData, device: torch.device) -> str:
    probe = val.probes.identity["vocab"]
    relevant = {"val_loss": [val.identity],
                "logit_lens": [val.identity, options["icl_seq_len"], options["icl_batch"], options["seed"], probe],
                "icl": [options["icl_seq_len"], options["icl_batch"], options["seed"], probe],
                "icl_text": [val.probes.identity["windows"]], "composition": []}
    relevant["heads"] = relevant["icl"]
    relevant["ablation"] = relevant["icl"] + [options["ablation_method"]]
    # Kernels and autocast differ between device types: a CUDA result does not stand for a CPU one.
    return hashlib.sha1(json.dumps([metric, relevant[metric], device.type]).encode()).hexdigest()[:16]


def _checkpoint_identity(path: Path) -> dict:
    weights = path / "model.safetensors"
    stat = weights.stat() if weights.is_file() else None
    return {"mtime_ns": stat.st_mtime_ns, "size": stat.st_size} if stat else {}


def _load(path: Path, device: str) -> HookedGPT2:
    try:
        return HookedGPT2.from_pretrained(path).to(device).eval()
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {e}") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# The report.
def write_report(results: dict, out: Path) -> Path:
    rows, crossing = results["checkpoints"], results["crossing"]
    page = Page(f"Over training: {results['run_dir']}")
    x, x_note = _log_x([r["tokens_seen"] for r in rows])
    page.add_text(f"{len(rows)} checkpoints, steps {rows[0]['step']} to {rows[-1]['step']}. {x_note}", note=True)
    for note in results["notes"]:
        page.add_text(note, note=True)
    names = results["metrics"]
    marks = crossing_marks(results)
    if results.get("formation"):
        page.add_heading("How the circuit formed")
        page.add_text(story(results))

    if "val_loss" in names and any(r["val_loss"] is not None for r in rows):
        fig = _lines(x, {"validation loss (recomputed)": [r["val_loss"] for r in rows]}, "Validation loss", "loss")
        logged = [(xi, r["logged_val_loss"]) for xi, r in zip(x, rows) if r["logged_val_loss"] is not None]
        if logged:
            fig.add_trace(go.Scatter(x=[p[0] for p in logged], y=[p[1] for p in logged], mode="markers",
                                     name="logged by the run", marker={"symbol": "x", "size": 9}))
        page.add_heading("Validation loss")
        page.add_plotly(_mark_crossings(fig, x, rows, marks))

    if "icl" in names:
        page.add_heading("In-context learning")
        page.add_text(f"Loss on the first repetition of {results['options']['icl_batch']} random sequences minus loss "
                      "on their second repetition (positive: the model uses the context to predict the repeat); "
                      f"{results['options'].get('probe_tokens', 'random tokens')}.")
        fig = _lines(x, {"in-context learning score": [r["icl"] for r in rows]},
                     "In-context learning score (repeated random tokens)", "loss difference (nats)")
        page.add_plotly(_mark_crossings(fig, x, rows, marks))
        page.add_text(_crossing_text(crossing) if "heads" in names else "head scores not computed (--metrics heads)")
    if "icl_text" in names and any(r.get("icl_text") is not None for r in rows):
        add_text_icl(page, x, rows, marks)

    if "heads" in names:
        page.add_heading("Head detector scores")
        n_layers, n_heads = len(rows[0]["heads"]["induction"]), len(rows[0]["heads"]["induction"][0])
        labels = [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)]
        for detector in DETECTORS:
            series = {label: [_flat(r["heads"][detector])[i] for r in rows] for i, label in enumerate(labels)}
            fig = _lines(x, series, f"{detector.replace('_', '-')} score per head", "score")
            fig.update_yaxes(range=[0, 1.02])
            page.add_plotly(_mark_crossings(fig, x, rows, marks))
        z = [[_flat(r["heads"]["induction"])[i] for r in rows] for i in range(len(labels))]
        fig = heatmap(z, x=[str(r["step"]) for r in rows], y=labels, title="induction score over time",
                      xlabel="step", ylabel="head", diverging=False)
        fig.update_traces(zmin=0, zmax=1)
        page.add_plotly(fig)

    if "logit_lens" in names:
        page.add_heading("Logit lens: loss read off each layer")
        n_layers = len(rows[0]["logit_lens"])
        series = {f"after layer {l}": [r["logit_lens"][l] for r in rows] for l in range(n_layers)}
        page.add_plotly(_mark_crossings(_lines(x, series, "Next-token loss through ln_final and the unembedding", "loss"),
                                        x, rows, marks))

    if "ablation" in names:
        page.add_heading("Head ablation importance")
        page.add_text(f"Change in loss on the second repetition when each head is {results['options']['ablation_method']}-ablated.")
        n_layers, n_heads = len(rows[0]["ablation"]), len(rows[0]["ablation"][0])
        labels = [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)]
        series = {label: [_flat(r["ablation"])[i] for r in rows] for i, label in enumerate(labels)}
        page.add_plotly(_mark_crossings(_lines(x, series, "Loss increase when the head is ablated", "loss change"),
                                        x, rows, marks))

    if results.get("formation"):
        add_formation(page, x, rows, results["formation"], marks, "composition" in names)

    page.add_heading("Per checkpoint")
    header = ["step", "tokens seen"] + [h for h, m in (("val loss", "val_loss"), ("logged val loss", "val_loss"),
                                                        ("ICL score", "icl"), ("best induction", "heads")) if m in names]
    table = []
    for r in rows:
        row = [r["step"], r["tokens_seen"]]
        if "val_loss" in names:
            row += [_na(r["val_loss"]), _na(r["logged_val_loss"])]
        if "icl" in names:
            row.append(r["icl"])
        if "heads" in names:
            row.append(max(_flat(r["heads"]["induction"])))
        table.append(row)
    page.add_table(header, table)
    return page.save(out)


# The circuit's story: crossings marked on every plot, natural-text ICL, K-composition,
# per-head crossing steps and the induction head's attention before, during and after.
def crossing_marks(results: dict) -> list[tuple[int, str, str]]:
    """(step, label, colour) of the first previous-token and induction crossings."""
    formation, marks = results.get("formation"), []
    prev = earliest((formation or {}).get("previous_token_crossings", {}))
    step = results["crossing"]["step"] if results["crossing"] is not None else None
    if prev is not None and prev == step:  # one line, one label: two would be drawn over each other
        return [(step, f"previous-token and induction scores >= {CROSSING} at step {step}", "red")]
    if prev is not None:
        marks.append((prev, f"previous-token score >= {CROSSING} at step {prev}", "green"))
    if step is not None:
        marks.append((step, f"induction score >= {CROSSING} at step {step}", "red"))
    return marks


def _mark_crossings(fig: go.Figure, x: list, rows: list[dict], marks) -> go.Figure:
    ys = [y for trace in fig.data for y in (trace.y or []) if y is not None and math.isfinite(y)]
    low, high = (min(ys), max(ys)) if ys else (0, 1)
    if fig.layout.yaxis.range is not None:
        low, high = fig.layout.yaxis.range
    steps = [r["step"] for r in rows]
    for step, label, colour in marks:
        cx = x[steps.index(step)]
        fig.add_trace(go.Scatter(x=[cx, cx], y=[low, high], mode="lines+text", name=label, text=["", label],
                                 textposition="top left", line={"dash": "dash", "color": colour}))
    return fig


def story(results: dict) -> str:
    """One paragraph: which heads formed when, and what the ICL scores did around then."""
    f, rows, crossing = results["formation"], results["checkpoints"], results["crossing"]
    layer, head = f["induction_head"]
    prev_step = f["previous_token_crossings"].get(f"L{f['previous_token_head'][0]}H{f['previous_token_head'][1]}") \
        if f["previous_token_head"] else None
    parts = []
    if f["previous_token_head"]:
        pl, ph = f["previous_token_head"]
        parts.append(f"Previous-token head L{pl}H{ph}: " + (f"score first >= {CROSSING} at step {prev_step}."
                                                             if prev_step is not None else f"never reaches {CROSSING}."))
    ind_step = f["induction_crossings"][f"L{layer}H{head}"]
    parts.append(f"Induction head L{layer}H{head}: " + (f"score first >= {CROSSING} at step {ind_step}."
                                                         if ind_step is not None else f"never reaches {CROSSING}."))
    if prev_step is not None and ind_step is not None:
        parts.append("The previous-token head formed " + ("first." if prev_step < ind_step else
                                                          "at the same checkpoint." if prev_step == ind_step else "after it."))
    views = {v["label"]: v for v in f["views"]}
    if crossing is not None and "before" in views:
        b, a = views["before"], views["after"]
        for key, name in (("icl", "In-context learning score (repeated random tokens)"),
                          ("icl_text", "Natural-text score (late minus early loss)")):
            if b.get(key) is not None and a.get(key) is not None:
                parts.append(f"{name}: {b[key]:.2f} at step {b['step']}, {views['during'][key]:.2f} at step "
                             f"{views['during']['step']}, {a[key]:.2f} at step {a['step']}.")
    loss = f.get("loss")
    if loss is not None:
        parts.append(f"Validation loss: {loss['before']['val_loss']:.2f} at step {loss['before']['step']}, "
                     f"{loss['during']['val_loss']:.2f} at the crossing, {loss['after']['val_loss']:.2f} at step "
                     f"{loss['after']['step']}; " + (
                         "it does not rise after the crossing." if loss["rise"] <= 0 else
                         f"the last checkpoint is {loss['rise']:.3f} above its lowest after the crossing "
                         f"({loss['lowest_after']:.3f})."))
    return " ".join(parts)


def add_text_icl(page: Page, x: list, rows: list[dict], marks) -> None:
    first = next(r for r in rows if r.get("icl_text") is not None)
    a, b, c, d = first["icl_text_positions"]
    page.add_text(f"Olsson et al.'s in-context learning score on the run's validation text: mean loss at target "
                  f"positions {c} to {d} minus mean loss at positions {a} to {b} (negative: tokens late in the "
                  "context are predicted better, because the model uses the context).")
    series = {"late minus early loss": [r.get("icl_text") for r in rows]}
    fig = _lines(x, series, "In-context learning score (natural text, Olsson et al.)", "loss difference (nats)")
    page.add_plotly(_mark_crossings(fig, x, rows, marks))


def add_formation(page: Page, x: list, rows: list[dict], f: dict, marks, composition: bool) -> None:
    layer, head = f["induction_head"]
    page.add_heading("When each head formed")
    page.add_table(["head", f"previous-token score >= {CROSSING} at step", f"induction score >= {CROSSING} at step"],
                   [[name, _na(f["previous_token_crossings"][name]), _na(f["induction_crossings"][name])]
                    for name in f["induction_crossings"]])
    if composition and f["previous_token_head"] and rows[0].get("composition") is not None:
        pl, ph = f["previous_token_head"]
        page.add_heading("K-composition: the induction head's keys read the previous-token head")
        page.add_text(f"K-composition score of L{pl}H{ph} (best layer-{pl} previous-token head at the last checkpoint) "
                      f"into L{layer}H{head} (best induction head), beside the mean over the other layer-0/layer-1 pairs: "
                      "|W_QK W_OV^T| / (|W_QK| |W_OV|), layer-norm gains folded in.")
        pair = [r["composition"][ph][head] for r in rows]
        others = [(sum(map(sum, r["composition"])) - r["composition"][ph][head])
                  / max(1, len(r["composition"]) * len(r["composition"][0]) - 1) for r in rows]
        fig = _lines(x, {f"L{pl}H{ph} -> L{layer}H{head}": pair, "other pairs (mean)": others},
                     "K-composition score", "score")
        page.add_plotly(_mark_crossings(fig, x, rows, marks))
    page.add_heading(f"Attention of L{layer}H{head} on a repeated sequence: before, during, after")
    page.add_text("The second half repeats the first; an induction head attends from each token of the repeat to the "
                  "token after that token's first occurrence (the off-diagonal stripe). Steps: "
                  + ", ".join(f"{v['label']} {v['step']} (induction score {v['induction']:.2f})" for v in f["views"]) + ".")

    page.add_circuitsvis("AttentionHeads", attention=np.array([v["pattern"] for v in f["views"]], dtype=np.float32),
                         tokens=f["view_tokens"], maskUpperTri=True,
                         attentionHeadNames=[f"step {v['step']} ({v['label']})" for v in f["views"]])


def _crossing_text(crossing) -> str:
    if crossing is None:
        return f"No head's induction score reaches {CROSSING} in these checkpoints."
    layer, head = crossing["head"]
    return (f"The best induction score first reaches {CROSSING} at step {crossing['step']} "
            f"({crossing['tokens_seen']:,} tokens seen): head L{layer}H{head}, score {crossing['score']:.2f}.")


def _log_x(tokens_seen: list[int]) -> tuple[list[float], str]:
    positive = [t for t in tokens_seen if t and t > 0]
    if len(positive) == len(tokens_seen):
        return tokens_seen, "x axis: tokens seen, log scale (the buttons above each plot switch it to linear)."
    floor = min(positive) / 2 if positive else 1
    return [t if t and t > 0 else floor for t in tokens_seen], \
        f"x axis: tokens seen, log scale (the buttons above each plot switch it to linear); step 0 is drawn at " \
        f"{floor:g} tokens."


def _lines(x, series: dict, title: str, ylabel: str) -> go.Figure:
    fig = go.Figure([go.Scatter(x=x, y=y, mode="lines+markers", name=name) for name, y in series.items()])
    fig.update_layout(title=title, xaxis_title="tokens seen", yaxis_title=ylabel, height=420,
                      updatemenus=[X_SCALE_BUTTONS])
    fig.update_xaxes(type="log")
    return fig


# Log tokens show the early checkpoints; a phase change late in a run (the demo's, at about
# 2.5M of its 3.1M tokens) spreads out on a linear axis. One click switches.
X_SCALE_BUTTONS = dict(
    type="buttons", direction="left", x=1, xanchor="right", y=1.18, yanchor="top", showactive=True,
    buttons=[dict(label=f"{scale} x", method="relayout", args=[{"xaxis.type": scale, "xaxis.autorange": True}])
             for scale in ("log", "linear")])


def _flat(per_head: list[list[float]]) -> list[float]:
    return [v for row in per_head for v in row]


def _na(value):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analyses.over_training",
                                description="Analyses across every checkpoint of a training run, with an HTML report.")
    p.add_argument("run_dir", help="run directory (RUN/checkpoints/step_*; RUN/config.json for the validation data)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated metrics from {', '.join(METRICS)} (default: all but ablation)")
    p.add_argument("--out", default=None, help="directory for over_training.json and over_training.html (default: RUN/analysis)")
    p.add_argument("--icl-seq-len", type=int, default=20, help="length of each random sequence that is repeated")
    p.add_argument("--icl-batch", type=int, default=8, help="number of repeated random sequences")
    p.add_argument("--seed", type=int, default=0, help="seed for the random sequences (fixed across checkpoints)")
    p.add_argument("--probe-top", type=int, default=None,
                   help="draw the random probe tokens from the run's N most frequent training tokens (0: every id; "
                   "default: its --repeat-vocab if it trained on repeated spans, else 1000)")
    p.add_argument("--ablation-method", default="mean", choices=["zero", "mean", "resample"], help="how heads are ablated")
    p.add_argument("--device", default="auto", help=cli.DEVICE_HELP)
    args = p.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    results = over_training(args.run_dir, metrics, icl_seq_len=args.icl_seq_len, icl_batch=args.icl_batch,
                            seed=args.seed, ablation_method=args.ablation_method, probe_top=args.probe_top,
                            device=args.device)
    out = cli.out_dir(args.out or Path(args.run_dir) / rundir.ANALYSIS)
    print(_crossing_text(results["crossing"]) if "heads" in metrics else "")
    return cli.finish(out, functools.partial(write_report, results), results, html="over_training.html", data="over_training.json")


if __name__ == "__main__":
    cli.run(main)
