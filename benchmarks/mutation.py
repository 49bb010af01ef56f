"""Mutation testing of the analyses and the activation cache with mutmut (not run in CI).

    nice -n 15 python benchmarks/mutation.py --minutes 30

Copies the checkout's tracked files to a scratch directory (mutmut writes a ``mutants/``
tree beside the code), points mutmut at ``analyses/`` and ``hooked_gpt2/cache.py`` with
the tests that exercise them, runs it for at most ``--minutes``, and prints the score:
killed / (killed + survived), mutants not reached in time counted apart. Survivors are
listed with ``mutmut show NAME`` from the scratch directory; docs/testing.md records the
last run and the survivors judged equivalent.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The analyses' maths and the cache; the report scripts' plotting and argument parsing
# (lines matching SKIP_LINES, and the modules that only draw or compare runs) are left
# out: a changed plot title or help string is not a wrong analysis.
MUTATE = ["analyses/common.py", "analyses/heads.py", "analyses/ablation.py", "analyses/patching.py",
          "analyses/dla.py", "analyses/logit_lens.py", "hooked_gpt2/cache.py"]
SKIP_LINES = [r"add_argument\(", r"page\.add_", r"heatmap\(", r"fig\.", r"go\.", r"Page\(", r"print\(",
              r"cli\.", r"raise \w*Error\(", r"^\s*(title|text|x|y)="]
TESTS = [
    "tests/test_analyses_exact.py", "tests/test_analyses_known_answers.py", "tests/test_cache.py",
    "tests/test_cache_known_answers.py",
]


def copy_checkout(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    shutil.rmtree(dest, ignore_errors=True)
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)


def write_config(dest: Path, tests: list[str]) -> None:
    def lines(values):
        return "\n".join(f"    {v}" for v in values)

    (dest / "setup.cfg").write_text(
        "[mutmut]\n"
        f"source_paths =\n{lines(sorted({m.split('/')[0] + '/' for m in MUTATE}))}\n"
        f"only_mutate =\n{lines(MUTATE)}\n"
        f"do_not_mutate_patterns =\n{lines(SKIP_LINES)}\n"
        f"pytest_add_cli_args_test_selection =\n{lines(tests)}\n"
        f"also_copy =\n{lines(['hooked_gpt2/', 'data_prep/', 'training/', 'tests/', 'conftest.py', 'studies/'])}\n"
        "pytest_add_cli_args =\n    -p no:cacheprovider\n    --no-header\n    -q\n    -o\n    addopts=\n"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/hooked-gpt2-mutation", help="scratch copy of the checkout")
    p.add_argument("--minutes", type=float, default=30, help="stop mutmut after this long")
    p.add_argument("--children", type=int, default=2, help="mutants tested in parallel")
    p.add_argument("--resume", action="store_true", help="continue a previous run in --workdir")
    p.add_argument("--tests", nargs="*", default=TESTS, help="test files that may kill a mutant")
    args = p.parse_args()
    work = Path(args.workdir)
    if not args.resume:
        copy_checkout(work)
        write_config(work, args.tests)
    cmd = ["timeout", f"{int(args.minutes * 60)}", sys.executable, "-m", "mutmut", "run",
           "--max-children", str(args.children)]
    # mutmut forks a worker per mutant: a child forked after OpenMP has started its
    # threads hangs in its first parallel region, so torch runs single-threaded here.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=work, env=env)
    print(f"mutmut exited with {run.returncode} (124: stopped at the time limit)")
    results = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                             capture_output=True, text=True).stdout
    status = {}
    for line in results.splitlines():
        m = re.match(r"\s*(\S+):\s*(\w[\w ]*)$", line)
        if m:
            status[m.group(1)] = m.group(2).strip()
    counts = Counter(status.values())
    killed, survived = counts.get("killed", 0), counts.get("survived", 0)
    print(json.dumps(dict(counts), indent=1))
    if killed + survived:
        print(f"score: {killed} killed of {killed + survived} tested = {killed / (killed + survived):.1%}"
              f" ({len(status) - killed - survived} not killed or survived: not reached, timeouts, ...)")
    (work / "survivors.txt").write_text("".join(f"{k}\n" for k, v in sorted(status.items()) if v == "survived"))
    print(f"survivors listed in {work / 'survivors.txt'}; inspect one with: cd {work} && python -m mutmut show NAME")
    return 0


if __name__ == "__main__":
    sys.exit(main())
