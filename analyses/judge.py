"""Score fine-tuned models' responses with an LLM judge: ``python -m analyses.judge --help``.

    ollama serve & ollama pull llama3.1                     # or vLLM, llama.cpp's server, any
    python -m analyses.judge runs/sft-a runs/sft-b \\        # OpenAI-compatible endpoint
        --base-url http://localhost:11434/v1 --model llama3.1 --out runs/judged
    OPENAI_API_KEY=... python -m analyses.judge runs/sft-a --base-url https://api.openai.com/v1 --model gpt-4o

Each input is a fine-tuning run directory (its ``responses.jsonl``, written by
``training.finetune``) or such a file. Every response is sent to the judge's
``/chat/completions`` with the rubric below and gets a score from 0 to 100. Requests run
``--concurrency`` at a time; a server error (5xx, 429), a timeout or a reply without a
score is retried with exponential back-off. Scores are appended to ``OUT/scores.jsonl``
as they arrive, so an interrupted run loses nothing: a re-run asks only for what is
missing. The result: the mean score per model with a 95% t confidence interval, printed
as one table and written to ``OUT/summary.json`` and ``OUT/report.html`` (self-contained).

The API key, if the endpoint needs one, is read from the environment variable named by
``--api-key-env`` (default ``OPENAI_API_KEY``); it is never written anywhere.
"""

import argparse
import json
import math
import os
import random
import re
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from tqdm import tqdm

from hooked_gpt2.atomic import atomic_write

from .cli import finish, run
from .common import AnalysisError
from .compare_runs import LEVEL, t_quantile
from .html import Page

# The rubric: the reference series' question ("score the model response on a scale from
# 0 to 100, where 100 is the best score; respond with the integer number only") with the
# scale spelled out, so that different judges use it alike.
RUBRIC = """You are grading a language model's response to an instruction.

### Instruction:
{instruction}
{input_block}
### Reference answer (one good response):
{output}

### Model response to grade:
{response}

Score the model response on a scale from 0 to 100, where 100 is the best score:
- 0: empty, unrelated to the instruction, or nonsense;
- 25: on topic but wrong or mostly unhelpful;
- 50: partly correct or partly follows the instruction;
- 75: correct and follows the instruction, with small errors or omissions;
- 100: as correct, complete and clear as the reference answer, or better.
Judge correctness and instruction-following, not length or style. Respond with the integer number only."""


class JudgeError(RuntimeError):
    """The judge cannot go on (no server, refused key, a server that keeps failing)."""


class Malformed(Exception):
    """A reply that holds no score; retried."""


class Retryable(Exception):
    """A server error or timeout; retried."""


def rubric_prompt(row: dict) -> str:
    input_block = f"\n### Input:\n{row['input']}\n" if row.get("input") else ""
    return RUBRIC.format(instruction=row["instruction"], input_block=input_block, output=row.get("output", ""),
                         response=row["response"])


def parse_score(reply: dict) -> tuple[float, str]:
    """The score in a chat-completions reply, and the reply's text."""
    try:
        text = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise Malformed(f"no choices[0].message.content in {json.dumps(reply)[:200]}") from None
    match = re.search(r"-?\d+(?:\.\d+)?", text or "")
    if match is None or not 0 <= float(match.group()) <= 100:
        raise Malformed(f"no score from 0 to 100 in {text!r:.200}")
    return float(match.group()), text


class Client:
    """A minimal OpenAI-compatible chat-completions client on the standard library."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 4, backoff: float = 1.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.backoff = retries, backoff

    def post(self, prompt: str) -> dict:
        body = json.dumps({"model": self.model, "temperature": 0,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            if e.code >= 500 or e.code == 429:
                raise Retryable(f"HTTP {e.code} from {self.url}") from None
            hint = {401: "set the API key in the variable --api-key-env names",
                    403: "the API key may not use this model",
                    404: f"check --base-url (it should end where /chat/completions follows, often /v1) and --model"}
            raise JudgeError(f"{self.url} answered HTTP {e.code} {e.reason}; {hint.get(e.code, 'check the request')}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, ConnectionRefusedError):
                raise JudgeError(f"cannot connect to {self.url}: connection refused; start the judge's server "
                                 "(e.g. ollama serve, vllm serve MODEL) or fix --base-url") from None
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise Retryable(f"no answer from {self.url} within {self.timeout} s") from None
            raise JudgeError(f"cannot reach {self.url}: {e.reason}; check --base-url") from None
        except (TimeoutError, socket.timeout, ConnectionResetError) as e:
            raise Retryable(f"{type(e).__name__} from {self.url}") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Malformed(f"a reply that is not JSON: {raw[:200]!r}") from None

    def score(self, row: dict) -> tuple[float, str] | None:
        """The judge's score for ``row``, retrying with back-off; None when every reply was
        malformed (the row stays unscored, for a later run)."""
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
            try:
                return parse_score(self.post(rubric_prompt(row)))
            except (Retryable, Malformed) as e:
                last = e
        if isinstance(last, Retryable):
            raise JudgeError(f"the judge kept failing after {self.retries + 1} attempts ({last}); "
                             "re-run later: scores so far are kept")
        return None


# Inputs and the scores file.
def read_responses(paths: list[str]) -> dict[str, list[dict]]:
    """Responses per model name (``model`` field, else the run directory's name)."""
    by_model: dict[str, list[dict]] = {}
    source: dict[str, Path] = {}
    for given in paths:
        path = Path(given)
        file = path / "responses.jsonl" if path.is_dir() else path
        if not file.is_file():
            raise AnalysisError(f"no responses at {file}: give a training.finetune run directory or its responses.jsonl")
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row["instruction"], row["response"]  # noqa: B018 - both are required
            except (json.JSONDecodeError, KeyError, TypeError):
                raise AnalysisError(f"{file}:{number} is not a response row (JSON with instruction and response, "
                                    "as training.finetune writes)") from None
            row.setdefault("id", number - 1)
            model = row.get("model") or file.parent.name
            if source.setdefault(model, file) != file:
                raise AnalysisError(f"{source[model]} and {file} both hold responses of a model named {model!r}; "
                                    "scores are kept per name, so give the runs different names")
            by_model.setdefault(model, []).append(row)
    return by_model


def read_scores(file: Path) -> list[dict]:
    """Complete rows of ``scores.jsonl``. A line cut short by a kill is dropped, and the
    file rewritten without it, so that new rows append cleanly."""
    if not file.is_file():
        return []
    text = file.read_text(encoding="utf-8")
    rows, good = [], []
    for line in text.splitlines(keepends=True):
        try:
            row = json.loads(line) if line.endswith("\n") else None
            if isinstance(row, dict) and {"model", "id", "score"} <= set(row):
                rows.append(row)
                good.append(line)
        except json.JSONDecodeError:
            pass
    if len(good) != len(text.splitlines()) or (text and not text.endswith("\n")):
        atomic_write(file, "".join(good))
    return rows


class ScoreFile:
    """Appends one JSON line per score, flushed to disk before the next."""

    def __init__(self, path: Path):
        self.path, self.lock = path, threading.Lock()

    def append(self, row: dict) -> None:
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def judge(paths: list[str], out: str | Path, client: Client, concurrency: int = 4,
          progress: bool = True) -> tuple[dict, Page]:
    """Score every response not yet in ``OUT/scores.jsonl``; return the summary and the
    report page (``main`` writes them)."""
    by_model = read_responses(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores_file = out / "scores.jsonl"
    done = {(r["model"], r["id"]) for r in read_scores(scores_file) if r.get("judge") == client.model}
    todo = [(m, row) for m, rows in by_model.items() for row in rows if (m, row["id"]) not in done]
    sink, unscored, stop = ScoreFile(scores_file), [], threading.Event()

    def work(model: str, row: dict) -> None:
        if stop.is_set():
            return
        result = client.score(row)
        if result is None:
            unscored.append((model, row["id"]))
        else:
            sink.append({"model": model, "id": row["id"], "score": result[0], "judge": client.model, "reply": result[1]})
        bar.update(1)

    with tqdm(total=len(todo), disable=not progress, unit="response", desc="judging") as bar, \
            ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(work, m, row) for m, row in todo]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f.exception() for f in finished if f.exception() is not None]
        if failed:
            stop.set()
            for f in futures:
                f.cancel()
            raise failed[0]
    summary = summarise(by_model, read_scores(scores_file), client.model)
    summary["unscored"] = [{"model": m, "id": i} for m, i in unscored]
    return summary, report_page(summary, by_model, read_scores(scores_file))


def mean_interval(values: list[float], level: float = LEVEL) -> dict:
    """Mean with a t confidence interval (None with fewer than two values)."""
    mean = statistics.fmean(values) if values else None
    if len(values) < 2:
        return {"n": len(values), "mean": mean, "low": None, "high": None}
    half = t_quantile(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"n": len(values), "mean": mean, "low": mean - half, "high": mean + half}


def summarise(by_model: dict[str, list[dict]], scores: list[dict], judge_model: str) -> dict:
    latest = {(r["model"], r["id"]): r["score"] for r in scores if r.get("judge") == judge_model}
    models = {}
    for model, rows in by_model.items():
        values = [latest[(model, row["id"])] for row in rows if (model, row["id"]) in latest]
        models[model] = {**mean_interval(values), "responses": len(rows)}
    return {"judge": judge_model, "level": LEVEL, "models": models}


def table(summary: dict) -> str:
    lines = [f"| model | mean score (0-100) | {round(100 * summary['level'])}% CI | scored |", "|---|---|---|---|"]
    for model, s in summary["models"].items():
        mean = "n/a" if s["mean"] is None else f"{s['mean']:.1f}"
        ci = "n/a" if s["low"] is None else f"[{s['low']:.1f}, {s['high']:.1f}]"
        lines.append(f"| {model} | {mean} | {ci} | {s['n']}/{s['responses']} |")
    return "\n".join(lines)


def report_page(summary: dict, by_model: dict, scores: list[dict]) -> Page:
    page = Page(f"LLM-judge scores ({summary['judge']})")
    page.add_text(f"Each response was scored from 0 to 100 by {summary['judge']} with the rubric below; the interval "
                  f"is a {round(100 * summary['level'])}% t confidence interval for the mean over responses.")
    page.add_table(["model", "mean", "low", "high", "scored", "responses"],
                   [[m, s["mean"], s["low"], s["high"], s["n"], s["responses"]] for m, s in summary["models"].items()])
    latest = {(r["model"], r["id"]): r["score"] for r in scores if r.get("judge") == summary["judge"]}
    for model, rows in by_model.items():
        page.add_heading(model)
        page.add_table(["id", "instruction", "input", "reference", "response", "score"],
                       [[r["id"], r["instruction"], r.get("input", ""), r.get("output", ""), r["response"],
                         latest.get((model, r["id"]), "unscored")] for r in rows])
    page.add_heading("Rubric")
    page.add_pre(RUBRIC)
    return page


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analyses.judge", description="Score responses.jsonl of fine-tuned models with an LLM judge behind an "
                                            "OpenAI-compatible chat-completions endpoint; mean and CI per model.")
    p.add_argument("responses", nargs="+", help="training.finetune run directories, or responses.jsonl files")
    p.add_argument("--base-url", required=True, help="endpoint root, e.g. http://localhost:11434/v1 (Ollama), "
                                                     "http://localhost:8000/v1 (vLLM)")
    p.add_argument("--model", required=True, help="the judge model's name at that endpoint")
    p.add_argument("--out", required=True, help="directory for scores.jsonl, summary.json and report.html")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key, if any")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    p.add_argument("--retries", type=int, default=4, help="retries of a failed or malformed request")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry (doubling after)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one reply")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.retries < 0 or args.backoff < 0 or args.timeout <= 0:
        raise AnalysisError("need --concurrency >= 1, --retries >= 0, --backoff >= 0 and --timeout > 0")
    client = Client(args.base_url, args.model, os.environ.get(args.api_key_env), args.timeout, args.retries, args.backoff)
    try:
        summary, page = judge(args.responses, args.out, client, args.concurrency, args.progress)
    except JudgeError as e:
        raise AnalysisError(str(e)) from None
    print(table(summary))
    if summary["unscored"]:
        print(f"{len(summary['unscored'])} response(s) got no score in {args.retries + 1} tries; re-run to retry them")
    return finish(Path(args.out), page.save, summary, data="summary.json")


if __name__ == "__main__":
    run(main)
