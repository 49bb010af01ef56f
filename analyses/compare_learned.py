"""What a run learned, read from its ``RUN/analysis/over_training.json`` for comparing runs.

``analyses.compare_runs`` compares these numbers across variants and seeds. Every reader
here takes the over-training results of one run and returns a number, or None when the
results do not hold what it needs (a metric not computed, an induction head that never
formed): a missing value is reported as missing, never as zero. The file's format may
grow (new metrics, new keys); readers look only for what they use.

>>> results = load_over_training(Path("runs/demo"))               # doctest: +SKIP
>>> run_values(results)["final_icl"]                              # doctest: +SKIP
"""

import json
from pathlib import Path

from training import rundir

from . import over_training as ot
from .cli import write_json
from .formation import best_induction_head, earliest

OVER_TRAINING = "over_training.json"
SHARE = 0.8  # concentration: how many heads carry this share of the in-context-learning effect

# name -> what it is, in words for the tables ("higher"/"lower" is said of it).
LABELS = {
    "crossing_step": "step at which the induction head forms (best induction score >= 0.5)",
    "crossing_tokens": "tokens seen when the induction head forms",
    "previous_token_step": "step at which a previous-token head forms (best previous-token score >= 0.5)",
    "loss_rise_after_crossing": "validation loss at the last checkpoint above its lowest from the induction crossing on",
    "final_icl": "in-context learning score at the last checkpoint",
    "max_icl": "largest in-context learning score over training",
    "best_previous_token": "best previous-token score at the last checkpoint",
    "best_induction": "best induction score at the last checkpoint",
    "heads_for_80pct": f"heads carrying {SHARE:.0%} of the in-context learning effect (ablation, last checkpoint)",
    "largest_head_share": "share of the in-context learning effect in its largest head (ablation, last checkpoint)",
}
# Per checkpoint: name -> (label, reader of one checkpoint row).
CURVES = {
    "icl": ("in-context learning score (loss on 1st repetition - loss on 2nd)", lambda row: _number(row.get("icl"))),
    "best_induction": ("best induction score", lambda row: best_head(row, "induction")),
    "best_previous_token": ("best previous-token score", lambda row: best_head(row, "previous_token")),
    "largest_head_share": ("share of the ICL effect in its largest head", lambda row: concentration(row)[1]),
}


def over_training_path(run: Path) -> Path:
    return Path(run) / rundir.ANALYSIS / OVER_TRAINING


def load_over_training(run: Path, compute: bool = True, log=print) -> dict | None:
    """The run's over-training results; computed (with head ablation) and written to
    ``RUN/analysis/over_training.json`` when the file is missing or has no ablation and
    ``compute`` is set (over_training caches per checkpoint: only what is new is computed)."""
    path = over_training_path(run)
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        results = None
    if compute and (results is None or "ablation" not in results.get("metrics", [])):
        metrics = list(dict.fromkeys([*ot.DEFAULT_METRICS, "ablation"]))
        log(f"over_training: {run} ({', '.join(metrics)})")
        results = ot.over_training(run, metrics, log=lambda *a: None)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, results)
    return results


def run_values(results: dict | None) -> dict[str, float | None]:
    """One number per name in ``LABELS`` plus ``logit_lens_<i>`` per layer (None where missing)."""
    results = results or {}
    rows = results.get("checkpoints") or []
    last = rows[-1] if rows else {}
    crossing = results.get("crossing") or {}
    icl = [v for v in (_number(row.get("icl")) for row in rows) if v is not None]
    heads_for_share, largest_share = concentration(last)
    values = {
        "crossing_step": _number(crossing.get("step")),
        "crossing_tokens": _number(crossing.get("tokens_seen")),
        "previous_token_step": earliest((results.get("formation") or {}).get("previous_token_crossings") or {}),
        "loss_rise_after_crossing": _number(((results.get("formation") or {}).get("loss") or {}).get("rise")),
        "final_icl": _number(last.get("icl")),
        "max_icl": max(icl) if icl else None,
        "best_previous_token": best_head(last, "previous_token"),
        "best_induction": best_head(last, "induction"),
        "heads_for_80pct": heads_for_share,
        "largest_head_share": largest_share,
    }
    for i, loss in enumerate(last.get("logit_lens") or []):
        values[f"logit_lens_{i}"] = _number(loss)
    return values


def logit_lens_label(i: int) -> str:
    return f"logit-lens loss read off layer {i}'s output (resid_post; last checkpoint)"


def label(name: str) -> str:
    return logit_lens_label(int(name.rsplit("_", 1)[1])) if name.startswith("logit_lens_") else LABELS[name]


def curve(results: dict | None, name: str) -> dict[int, tuple[int, float]]:
    """step -> (tokens seen, value) of a ``CURVES`` metric over the run's checkpoints."""
    read = CURVES[name][1]
    out = {}
    for row in (results or {}).get("checkpoints") or []:
        value = read(row)
        if value is not None and row.get("step") is not None:
            out[row["step"]] = (row.get("tokens_seen"), value)
    return out


def best_head(row: dict, detector: str) -> float | None:
    """The best ``detector`` score of one checkpoint; for induction, of the head the
    report's crossing follows (``formation.best_induction_head``: layer 1 on in a deeper
    model, where a layer-0 score is a fixed-offset coincidence)."""
    scores = (row.get("heads") or {}).get(detector)
    if detector == "induction" and scores:
        try:
            layer, head = best_induction_head(row)
        except (TypeError, ValueError, RuntimeError):  # missing or non-numeric scores
            return None
        return _number(scores[layer][head])
    flat = [_number(v) for layer in scores or [] for v in layer]
    flat = [v for v in flat if v is not None]
    return max(flat) if flat else None


def concentration(row: dict, share: float = SHARE) -> tuple[float | None, float | None]:
    """From one checkpoint's head ablation (loss increase on the second repetition per
    head): how many heads, largest first, carry ``share`` of the summed positive effect,
    and the largest head's part of it; (None, None) without ablation or positive effect."""
    effects = [max(0.0, v) for layer in row.get("ablation") or [] for v in layer if _number(v) is not None]
    total = sum(effects)
    if not total > 0:
        return None, None
    effects.sort(reverse=True)
    carried = 0.0
    for k, effect in enumerate(effects, 1):
        carried += effect
        if carried >= share * total:
            return float(k), effects[0] / total
    return float(len(effects)), effects[0] / total  # rounding: every head


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # NaN
        return None
    return float(value)
