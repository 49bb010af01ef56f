"""analyses.judge against a chat-completions server this test runs on 127.0.0.1: scores
parsed, a malformed reply and a 500 retried, resume after a kill, a refused connection."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from analyses.cli import run
from analyses.compare_runs import t_quantile
from analyses.judge import RUBRIC, Malformed, main, parse_score

REPO = Path(__file__).resolve().parents[1]


def score_of(model: str, item: int) -> int:
    return (item * 7 + (0 if model == "alpha" else 40)) % 101


class Judge:
    """A fake endpoint: scores item i of model m as ``score_of``, answers each item's first
    request as scripted (``fail``: 500, ``garble``: a reply without a number), and may
    wait before answering."""

    def __init__(self, fail=(), garble=(), delay=0.0):
        self.fail, self.garble, self.delay = set(fail), set(garble), delay
        self.requests: list[tuple[str, int]] = []
        self.headers: list[str | None] = []
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                model, item = re.search(r"(\w+) item (\d+)", prompt).groups()
                key = (model, int(item))
                with judge.lock:
                    first = key not in judge.requests
                    judge.requests.append(key)
                    judge.headers.append(self.headers.get("Authorization"))
                time.sleep(judge.delay)
                if first and key in judge.fail:
                    self.send_response(500)
                    self.end_headers()
                    return
                text = "I cannot decide." if first and key in judge.garble else f"{score_of(*key)}"
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def responses(tmp_path):
    """Two fine-tuning runs' responses.jsonl, 6 and 5 responses."""
    for model, n in (("alpha", 6), ("beta", 5)):
        run_dir = tmp_path / model
        run_dir.mkdir()
        rows = [{"id": i, "instruction": f"Answer {model} item {i}.", "input": "x" if i % 2 else "",
                 "output": "ref", "response": f"resp {i}", "model": model} for i in range(n)]
        (run_dir / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [str(tmp_path / "alpha"), str(tmp_path / "beta")]


def args(server, out, *extra):
    return ["--base-url", server.url, "--model", "judge-1", "--out", str(out), "--backoff", "0.01",
            "--no-progress", *extra]


def test_scores_parsed_retried_and_summarised(responses, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret-key")
    server = Judge(fail=[("alpha", 1), ("beta", 3)], garble=[("alpha", 4)])
    try:
        assert main([*responses, *args(server, tmp_path / "out", "--concurrency", "3", "--api-key-env", "JUDGE_KEY")]) == 0
    finally:
        server.close()
    assert sorted(server.requests) == sorted([("alpha", i) for i in range(6)] + [("beta", i) for i in range(5)]
                                             + [("alpha", 1), ("beta", 3), ("alpha", 4)]), "each failure retried once"
    assert set(server.headers) == {"Bearer secret-key"}
    rows = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert sorted((r["model"], r["id"], r["score"]) for r in rows) == sorted(
        [(m, i, score_of(m, i)) for m, n in (("alpha", 6), ("beta", 5)) for i in range(n)])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for model, n in (("alpha", 6), ("beta", 5)):
        values = [score_of(model, i) for i in range(n)]
        mean = sum(values) / n
        sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
        half = t_quantile(0.975, n - 1) * sd / n ** 0.5
        s = summary["models"][model]
        assert s["n"] == n and s["mean"] == pytest.approx(mean)
        assert (s["low"], s["high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    table = capsys.readouterr().out
    assert f"| alpha | {summary['models']['alpha']['mean']:.1f} |" in table and "| beta |" in table
    page = (tmp_path / "out" / "report.html").read_text()
    assert "resp 5" in page and "Respond with the integer number only" in page and "<script src" not in page


def test_rubric_and_parsing():
    assert "0 to 100" in RUBRIC and "{response}" in RUBRIC
    reply = lambda text: {"choices": [{"message": {"content": text}}]}  # noqa: E731
    assert parse_score(reply(" 85\n"))[0] == 85 and parse_score(reply("Score: 70/100"))[0] == 70
    for bad in [reply("excellent"), reply("150"), {"error": "x"}, {"choices": []}]:
        with pytest.raises(Malformed):
            parse_score(bad)


def test_resume_after_kill_scores_only_what_is_missing(responses, tmp_path):
    server = Judge(delay=0.3)
    out = tmp_path / "out"
    scores = out / "scores.jsonl"
    cmd = [sys.executable, "-m", "analyses.judge", *responses, *args(server, out, "--concurrency", "1")]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (scores.is_file() and len(scores.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the judge wrote no scores"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    with open(scores, "a") as f:
        f.write('{"model": "alpha", "id": 5, "sco')  # as if killed in the middle of a write
    before = {(r["model"], r["id"]) for r in map(json.loads, scores.read_text().splitlines()[:-1])}
    assert 3 <= len(before) < 11
    first_run = len(server.requests)
    server.delay = 0.0
    try:
        assert main([*responses, *args(server, out)]) == 0
    finally:
        server.close()
    asked_again = server.requests[first_run:]
    everything = {(m, i) for m, n in (("alpha", 6), ("beta", 5)) for i in range(n)}
    assert sorted(asked_again) == sorted(everything - before), "only the missing responses are asked for"
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert sorted((r["model"], r["id"]) for r in rows) == sorted(everything), "each scored once, none lost"


def test_refused_connection_is_one_clear_error(responses, tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [*responses, "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m", "--out", str(tmp_path / "o"),
            "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        run(main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot connect to") and "connection refused" in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_two_inputs_with_one_model_name_are_refused(responses, tmp_path):
    other = tmp_path / "elsewhere" / "alpha"
    other.mkdir(parents=True)
    (other / "responses.jsonl").write_text((Path(responses[0]) / "responses.jsonl").read_text())
    with pytest.raises(ValueError, match="both hold responses of a model named 'alpha'"):
        main([responses[0], str(other), "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out",
              str(tmp_path / "o"), "--no-progress"])
