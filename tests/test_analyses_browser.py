"""Every report renders offline in headless Chromium: plots and visualisations drawn, no
console errors, and nothing on the page refers to a network address."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from analyses import ablation, attention, dla, heads, logit_lens, patching, report
from analyses.html import circuitsvis_bundle, plotly_bundle

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
# Only the rendering test needs the browser; the offline and size checks run without it.
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (.ci/run installs Debian's chromium)")

PROMPT = ["--prompt", "The cat sat on the mat. The cat sat"]
SCRIPTS = {
    "logit_lens": (logit_lens, PROMPT),
    "attention": (attention, PROMPT),
    "ablation": (ablation, PROMPT + ["--reference-batch", "4"]),
    "heads": (heads, ["--seq-len", "8", "--batch", "2"]),
    "dla": (dla, PROMPT + ["--answer", " on"]),
    "patching": (patching, ["--kinds", "resid_pre,attn_out,head_out,pattern"]),
    "report": (report, PROMPT + ["--clean", "When John and Mary went to the store, John gave a drink to",
                                 "--corrupted", "When John and Mary went to the store, Mary gave a drink to",
                                 "--answer", " Mary", "--wrong", " John"]),
}


@pytest.fixture(scope="module")
def reports(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    paths = {}
    for name, (module, extra) in SCRIPTS.items():
        out = tmp_path_factory.mktemp(name)
        assert module.main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), *extra]) == 0
        paths[name] = out / "report.html"
    return paths


def chromium(page: Path, tmp_path: Path, *mode: str) -> str:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000", "--virtual-time-budget=15000",
        *mode, page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path).stdout


@needs_chromium
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_report_renders_offline_without_errors(name, reports, tmp_path):
    page = reports[name]
    source = page.read_text(encoding="utf-8")
    expected_plots = source.count('class="plotly-graph-div"')
    expected_visuals = source.count('class="circuitsvis-figure"')
    assert expected_plots + expected_visuals > 0
    dom = chromium(page, tmp_path, "--dump-dom")
    body = re.search(r"<body([^>]*)>", dom)
    assert body and 'data-rendered="true"' in body.group(1), dom[:2000]
    assert f'data-plots="{expected_plots}"' in body.group(1), body.group(1)
    assert f'data-visuals="{expected_visuals}"' in body.group(1), body.group(1)
    errors = re.search(r'<pre id="report-errors">(.*?)</pre>', dom, re.S)
    assert errors is not None and errors.group(1).strip() == "", errors.group(1)
    if name == "report":
        shot = tmp_path / "report.png"
        chromium(page, tmp_path, f"--screenshot={shot}")
        assert shot.stat().st_size > 10_000


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_report_refers_to_no_network_address(name, reports):
    source = reports[name].read_text(encoding="utf-8")
    # Each library bundle is inlined exactly once (or not at all)...
    for bundle in (plotly_bundle(), circuitsvis_bundle()):
        escaped = bundle.replace("</script", "<\\/script")
        assert source.count(escaped) <= 1
        source = source.replace(escaped, "")
    # ...and nothing else on the page names a URL. (The bundles' own source text mentions
    # documentation URLs in strings, which load nothing.)
    assert not re.search(r"https?://|//unpkg|cdn\.", source), re.search(r".{80}(https?://|cdn\.).{80}", source)
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", source)


def test_combined_report_stays_small(reports):
    size = reports["report"].stat().st_size
    bundles = len(plotly_bundle()) + len(circuitsvis_bundle())
    assert size < bundles + 1_500_000, f"{size / 1e6:.1f} MB"
