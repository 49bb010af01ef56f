"""Intervention studies: a baseline, variants of it, each trained with several seeds.

    python -m training.study studies/reference_interventions.toml            # runs/study-<name>
    python -m training.study STUDY.toml --out runs/my-study --dry-run        # print the plan
    python -m training.study STUDY.toml --jobs 2                             # two runs at a time
    python -m analyses.compare_runs runs/study-<name>                        # the comparison

A study file (TOML)::

    name = "example"
    seeds = [0, 1]
    vary = "init"              # which noise the seeds vary: "init", "data" or "both" (see below)
    [baseline]                 # TrainConfig keys (as in RUN/config.json), [baseline.model] for GPT2Config
    preset = "tiny"
    max_steps = 100
    [variants.no_dropout]      # overrides of the baseline: the intervention, or any other key
    model = { dropout = 0.0 }
    [variants.stacked]         # optional: several variants' overrides together
    stack = ["no_dropout", "..."]

Runs go to ``STUDY_DIR/<variant>/seed_<n>/``, the baseline first, one after another; the
resolved plan is ``STUDY_DIR/study.json``. Two kinds of noise separate the seeds of a
variant, and ``vary`` says which the study varies:

- ``init`` (the default): run ``seed_n`` has initialisation (and dropout) seed n and reads
  the training data in order, the same for every run;
- ``data``: every run has initialisation seed ``init_seed`` (default 0), and run ``seed_n``
  reads the training sequences in the shuffled order of data-order seed n;
- ``both``: run ``seed_n`` has initialisation seed n and data-order seed n.

Either way, for a given n all variants share data order and, where shapes agree,
initialisation, so differences can be paired by seed. A re-run skips finished runs (their
final checkpoint exists) and resumes an interrupted one. A run that fails (a non-finite
loss, say) is marked failed (``RUN/failed.json``, with the error), reported, and skipped;
the study goes on with the others, and a re-run skips it too (delete its failed.json, or
the run, to try it again).

With ``--jobs N`` the runs train N at a time, each in its own process
(``python -m training.study --train-run CONFIG``) with ``1/N`` of the CPU threads and its
output in ``STUDY_DIR/logs/``; Ctrl-C or SIGTERM makes every running run save a resumable
checkpoint and stop, and the study raises ``StudyInterrupted`` as with one job.
"""

import argparse
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_prep.reader import ShardError
from data_prep.sources import DataPrepError
from hooked_gpt2 import CheckpointError, ConfigError
from hooked_gpt2.atomic import atomic_write

from . import rundir
from .config import EXPERIMENT_ROLES, TrainConfig, changed_fields, default_data, fields_with_roles, tomllib
from .train import TrainingError, prepare_default_data, train, vocab_fields

BASELINE = "baseline"
STUDY_KEYS = {"name", "seeds", "vary", "init_seed", "baseline", "variants", "out"}
VARY = ("init", "data", "both")
NOT_PER_RUN = {"out", "resume", "overwrite", *fields_with_roles("replicate")}  # the study sets these for each run


class StudyError(ValueError):
    """A study file or directory that cannot be run; the message says what to fix."""


class StudyInterrupted(RuntimeError):
    """A run stopped before its last step (Ctrl-C, SIGTERM); re-running the study resumes it."""


def load_study(path: str | Path) -> dict:
    """Read and check a study file: ``{"name", "seeds", "baseline", "variants", "out"}``,
    every variant's overrides already merged into a full set of TrainConfig keys.

    >>> study = load_study("studies/reference_interventions.toml")  # doctest: +SKIP
    >>> list(study["variants"])[0]  # doctest: +SKIP
    'baseline'
    """
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"study file {path} is not valid TOML: {e}") from None
    return resolve_study(raw, default_name=path.stem)


def resolve_study(raw: dict, default_name: str = "study") -> dict:
    """The study as ``load_study`` returns it, from the file's parsed TOML."""
    unknown = sorted(set(raw) - STUDY_KEYS)
    if unknown:
        raise StudyError(f"unknown study keys {unknown}; a study file has {sorted(STUDY_KEYS)}")
    seeds = raw.get("seeds", [0, 1])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds) and len(set(seeds)) == len(seeds)):
        raise StudyError(f"seeds must be a non-empty list of distinct integers, got {seeds!r}")
    vary, init_seed = raw.get("vary", "init"), raw.get("init_seed", 0)
    if vary not in VARY:
        raise StudyError(f"vary must be one of {', '.join(VARY)} (which noise the seeds vary), got {vary!r}")
    if not isinstance(init_seed, int) or "init_seed" in raw and vary != "data":
        raise StudyError(f"init_seed is the one initialisation seed of a study with vary = \"data\"; got {init_seed!r} "
                         f"with vary = {vary!r}")
    baseline = _normalise(raw.get("baseline", {}), BASELINE)
    variants = {BASELINE: {"overrides": {}, "stack": []}}
    raw_variants = raw.get("variants", {})
    if not isinstance(raw_variants, dict):
        raise StudyError("variants must be tables: [variants.NAME] with the keys they override")
    for name, table in raw_variants.items():
        if name == BASELINE or not name.replace("_", "").replace("-", "").isalnum():
            raise StudyError(f"variant name {name!r}: use letters, digits, - and _ (and not 'baseline')")
        table = dict(table)
        stack = table.pop("stack", [])
        missing = [s for s in stack if s not in raw_variants or s == name]
        if missing:
            raise StudyError(f"variant {name!r} stacks {missing}, which are not other variants of this study")
        overrides: dict = {}
        for part in stack:
            if raw_variants[part].get("stack"):
                raise StudyError(f"variant {name!r} stacks {part!r}, which is itself a stack; list its parts instead")
            overrides = _merge(overrides, _normalise(raw_variants[part], part))
        variants[name] = {"overrides": _merge(overrides, _normalise(table, name)), "stack": list(stack)}
    for name, variant in variants.items():
        variant["config"] = _merge(baseline, variant["overrides"])
        try:
            TrainConfig.from_dict(variant["config"]).model_config()  # unknown keys, bad values
        except (ConfigError, TypeError) as e:
            raise StudyError(f"variant {name!r}: {e}") from None
    return {"name": raw.get("name", default_name), "seeds": seeds, "vary": vary, "init_seed": init_seed,
            "baseline": baseline, "variants": variants, "out": raw.get("out")}


def _normalise(table: dict, where: str) -> dict:
    """TOML has no null: "off" means no clipping for grad_clip, and no dropout."""
    if not isinstance(table, dict):
        raise StudyError(f"{where}: expected a table of TrainConfig keys, got {table!r}")
    table = {k: (dict(v) if k == "model" else v) for k, v in table.items()}
    bad = sorted(set(table) & NOT_PER_RUN)
    if bad:
        raise StudyError(f"{where}: {bad} are set by the study for each run; remove them (use --out for the study directory)")
    if str(table.get("grad_clip", "")).lower() in ("off", "none"):
        table["grad_clip"] = None
    if str(table.get("model", {}).get("dropout", "")).lower() in ("off", "none"):
        table["model"]["dropout"] = 0.0
    return table


def _merge(base: dict, overrides: dict) -> dict:
    merged = {**base, **overrides}
    merged["model"] = {**base.get("model", {}), **overrides.get("model", {})}
    return merged


def run_config(study: dict, variant: str, seed: int, study_dir: Path) -> TrainConfig:
    """The TrainConfig of run ``seed_<seed>`` of ``variant``: its seeds as the study's ``vary`` says."""
    settings = {"progress": False, **study["variants"][variant]["config"]}
    vary = study.get("vary", "init")
    replicate = {"seed": study.get("init_seed", 0) if vary == "data" else seed,
                 "data_order_seed": seed if vary in ("data", "both") else None}
    return TrainConfig.from_dict({**settings, **replicate, "out": str(rundir.study_run_dir(study_dir, variant, seed))})


def check_unchanged(cfg: TrainConfig, path: Path) -> None:
    """A run already started must have been started with this study's settings (what
    the config calls the experiment: hardware and bookkeeping settings may differ)."""
    data = Path(cfg.data or default_data(cfg.preset)[0])
    if (data / "manifest.json").is_file():  # a compact vocabulary comes with the data, as training records it
        cfg = dataclasses.replace(cfg, model={**cfg.model, **vocab_fields(data, cfg.model)})
    changed = changed_fields(rundir.read_config(path), cfg, (*EXPERIMENT_ROLES, "replicate"))
    if changed:
        raise StudyError(f"{path} was trained with other settings than the study file now gives ({changed}); "
                         "restore the study file, or run it into a new --out")


def run_study(study: dict, study_dir: str | Path, *, stop_after: int | None = None, jobs: int = 1,
              log=print) -> list[tuple]:
    """Train every (variant, seed) run not yet finished; returns ``(variant, seed, action)``
    for each, action being ``skipped``, ``resumed``, ``trained`` or ``failed``.

    ``jobs`` > 1 trains that many runs at once, each in its own process with an equal share
    of the CPU threads (small models train faster side by side than one at a time with
    every thread). ``stop_after`` stops the first run that trains after that step, as an
    interrupt would (for tests, one job); the study then raises ``StudyInterrupted`` like
    after a Ctrl-C.
    """
    study_dir = Path(study_dir)
    if not isinstance(jobs, int) or jobs < 1:
        raise StudyError(f"jobs must be a positive integer, got {jobs!r}")
    study_dir.mkdir(parents=True, exist_ok=True)
    plan = {k: v for k, v in study.items() if k != "out"}
    rundir.write_study(study_dir, plan)
    actions, todo = {}, []
    configs = {(v, s): run_config(study, v, s, study_dir) for v in study["variants"] for s in study["seeds"]}
    for preset in sorted({cfg.preset for cfg in configs.values() if cfg.data is None}):
        prepare_default_data(preset, progress=False)  # once, here: runs side by side would race to make it
    for variant in study["variants"]:
        for seed in study["seeds"]:
            cfg = configs[variant, seed]
            path = Path(cfg.out)
            state = rundir.run_status(path)
            if state != "new":
                check_unchanged(cfg, path)
            if state == "finished":
                actions[variant, seed] = "skipped"
            elif state == "failed":
                log(f"study {study['name']}: {variant} seed {seed} failed before ({rundir.failure(path)}); skipped "
                    f"(delete {path / rundir.FAILED} to try it again)")
                actions[variant, seed] = "failed"
            else:
                overrides = {"resume": True} if state == "interrupted" else {"overwrite": True}
                todo.append((variant, seed, TrainConfig.from_dict({**cfg.to_dict(), **overrides}),
                             "resumed" if state == "interrupted" else "trained"))
    train_runs = (train_one_at_a_time if jobs == 1
                  else functools.partial(train_side_by_side, jobs=jobs, logs=study_dir / "logs"))
    actions.update(train_runs(study["name"], todo, stop_after=stop_after, log=log))
    return [(variant, seed, actions[variant, seed]) for variant in study["variants"] for seed in study["seeds"]]


def train_one_at_a_time(name: str, todo: list[tuple], *, stop_after: int | None, log) -> dict:
    """Train the runs of ``todo`` (variant, seed, config, action) in this process, in order."""
    actions = {}
    for variant, seed, cfg, action in todo:
        path = Path(cfg.out)
        log(f"study {name}: {'resuming' if action == 'resumed' else 'training'} {variant} seed {seed} -> {path}")
        try:
            train(cfg, stop_after=stop_after)
        except TrainingError as e:
            path.mkdir(parents=True, exist_ok=True)
            rundir.mark_failed(path, str(e))
            log(f"study {name}: {variant} seed {seed} FAILED: {e}")
            actions[variant, seed] = "failed"
            continue
        stop_after = None
        actions[variant, seed] = action
        if rundir.run_status(path) != "finished":
            raise StudyInterrupted(f"{variant} seed {seed} stopped before its last step; run the study "
                                   "again to resume it (finished runs are skipped)")
    return actions


# Exit codes of one run trained in a subprocess (``python -m training.study --train-run``).
RUN_FAILED, RUN_USER_ERROR = 3, 2


def train_side_by_side(name: str, todo: list[tuple], *, jobs: int, logs: Path, stop_after: int | None, log) -> dict:
    """Train the runs of ``todo`` ``jobs`` at a time, each in a subprocess with its share of
    the CPU threads; its output goes to ``logs/<variant>_seed_<n>.log``. Ctrl-C or
    SIGTERM asks every running run to save a resumable checkpoint and stop."""
    if stop_after is not None:
        raise StudyError("stop_after needs jobs=1")
    if not todo:
        return {}
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    logs.mkdir(exist_ok=True)
    pending, running, actions, stopping = list(todo), {}, {}, False

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while running or pending and not stopping:
            try:
                while pending and len(running) < jobs and not stopping:
                    variant, seed, cfg, action = pending.pop(0)
                    log_path = logs / f"{variant}_seed_{seed}.log"
                    config_path = logs / f"{variant}_seed_{seed}.json"
                    atomic_write(config_path, json.dumps(cfg.to_dict()) + "\n")
                    log(f"study {name}: {'resuming' if action == 'resumed' else 'training'} {variant} seed {seed} -> "
                        f"{cfg.out} ({threads} thread{'s' if threads > 1 else ''}; output in {log_path})")
                    with open(log_path, "a") as out:  # the run's own process group: Ctrl-C reaches it through us
                        proc = subprocess.Popen([sys.executable, "-m", "training.study", "--train-run", str(config_path)],
                                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                    running[proc] = (variant, seed, cfg, action, log_path)
                for proc in [p for p in running if p.poll() is not None]:
                    variant, seed, cfg, action, log_path = running.pop(proc)
                    actions[variant, seed] = finish_subprocess_run(name, variant, seed, cfg, action, proc.returncode,
                                                                   log_path, stopping, log)
                time.sleep(0.2)
            except KeyboardInterrupt:
                if not stopping:
                    log(f"study {name}: stopping; each running run saves a resumable checkpoint first")
                stopping = True
                for proc in running:
                    proc.send_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in running:  # an error stops the study: its runs stop resumably, none is left behind
            proc.send_signal(signal.SIGINT)
        for proc in running:
            proc.wait()
    unfinished = [f"{v} seed {s}" for (v, s), a in actions.items() if a == "interrupted"]
    if stopping or unfinished:
        raise StudyInterrupted(f"{', '.join(unfinished) or 'the study'} stopped before the last step; run the study "
                               "again to resume (finished runs are skipped)")
    return actions


def finish_subprocess_run(name, variant, seed, cfg, action, returncode, log_path: Path, stopping: bool, log) -> str:
    """What became of a run trained in a subprocess: its action, ``failed`` (marked, with
    the error), or ``interrupted`` (also a run the study's stop reached before it could
    save); a user error (bad data, config) stops the study."""
    path = Path(cfg.out)
    if rundir.run_status(path) == "finished":
        log(f"study {name}: {variant} seed {seed} finished")
        return action
    lines = log_path.read_text(errors="replace").splitlines() if log_path.is_file() else []
    error = next((line[len("error: "):] for line in reversed(lines) if line.startswith("error: ")), None)
    if returncode == RUN_USER_ERROR:
        raise StudyError(f"{variant} seed {seed}: {error or 'the run stopped with a user error'} (see {log_path})")
    if returncode == 0 or stopping and returncode != RUN_FAILED:
        return "interrupted"
    reason = error or f"exit code {returncode}: {lines[-1] if lines else 'no output'} (see {log_path})"
    path.mkdir(parents=True, exist_ok=True)
    rundir.mark_failed(path, reason)
    log(f"study {name}: {variant} seed {seed} FAILED: {reason}")
    return "failed"


def train_run_main(config_path: str) -> int:
    """One run of a study in its own process: exit 0 (finished or interrupted, resumable),
    ``RUN_FAILED`` for a run that failed (a non-finite loss) or ``RUN_USER_ERROR``."""
    try:
        cfg = TrainConfig.from_dict(json.loads(Path(config_path).read_text()))
        train(cfg)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return RUN_FAILED
    except (StudyError, ConfigError, ShardError, CheckpointError, DataPrepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return RUN_USER_ERROR
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.study",
                                description="Train a baseline and its variants with several seeds each (resumable).")
    p.add_argument("study", nargs="?", help="study file (TOML): name, seeds, [baseline], [variants.NAME]")
    p.add_argument("--out", default=None, help="study directory (default: the file's `out`, else runs/study-<name>)")
    p.add_argument("--dry-run", action="store_true", help="check the study file and print the runs, without training")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs to train at once, each in its own process with an equal share of the CPU threads "
                        "(default 1; small models on a CPU train about twice as fast per core two at a time). The "
                        "thread count can change a run's numbers in the last bits")
    p.add_argument("--train-run", default=None, help=argparse.SUPPRESS)  # one run, for --jobs: its config file
    args = p.parse_args(argv if argv is not None else sys.argv[1:])
    if args.train_run:
        return train_run_main(args.train_run)
    if args.study is None:
        p.error("the study file is required")
    try:
        study = load_study(args.study)
        out = Path(args.out or study["out"] or f"runs/study-{study['name']}")
        if args.dry_run:
            for variant, v in study["variants"].items():
                for seed in study["seeds"]:
                    state = rundir.run_status(rundir.study_run_dir(out, variant, seed))
                    print(f"{variant:>20} seed {seed}: {state:<11} {json.dumps(v['overrides'])}")
            return 0
        actions = run_study(study, out, jobs=args.jobs)
    except StudyInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except (StudyError, ConfigError, TrainingError, ShardError, CheckpointError, DataPrepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trained = sum(a in ("trained", "resumed") for *_, a in actions)
    failed = [f"{v} seed {s}" for v, s, a in actions if a == "failed"]
    print(f"study {study['name']}: {trained} runs trained, {sum(a == 'skipped' for *_, a in actions)} already "
          f"finished, {len(failed)} failed{' (' + ', '.join(failed) + ')' if failed else ''}, in {out}\n"
          f"compare them with: python -m analyses.compare_runs {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
