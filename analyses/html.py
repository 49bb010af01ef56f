"""Self-contained HTML pages: every script inlined, nothing fetched from the network.

A ``Page`` collects sections (headings, text, tables, plotly figures, circuitsvis
visualisations) and writes one HTML file. plotly.js and the circuitsvis bundle are each
inlined once per page, however many figures use them: the bundles are 3.5 MB and 1.3 MB.

Each page also carries a small status script: it records ``window.onerror``, unhandled
promise rejections and ``console.error`` calls into ``#report-errors``, and once the
page has loaded it sets ``data-rendered`` on ``<body>`` to the number of figures that
rendered. The browser tests read both from the DOM.

>>> page = Page("Example")
>>> page.add_text("Hello")
>>> "Hello" in page.render()
True
"""

import html
import json
import uuid
from pathlib import Path

import circuitsvis
import numpy as np
import plotly.graph_objects as go
import plotly.offline
from circuitsvis.utils.convert_props import convert_props

from hooked_gpt2.atomic import atomic_write

STATUS_SCRIPT = """
window.__reportErrors = [];
(function () {
  function record(message) {
    window.__reportErrors.push(String(message));
    var box = document.getElementById("report-errors");
    if (box) { box.textContent = window.__reportErrors.join("\\n"); }
  }
  window.addEventListener("error", function (e) { record("error: " + e.message); });
  window.addEventListener("unhandledrejection", function (e) { record("unhandled rejection: " + e.reason); });
  var consoleError = console.error;
  console.error = function () {
    record("console.error: " + Array.prototype.join.call(arguments, " "));
    consoleError.apply(console, arguments);
  };
  window.addEventListener("load", function () {
    setTimeout(function () {
      var box = document.getElementById("report-errors");
      if (box) { box.textContent = window.__reportErrors.join("\\n"); }
      var plots = 0;
      document.querySelectorAll(".plotly-graph-div").forEach(function (el) {
        if (el.querySelector(".main-svg")) { plots += 1; }
      });
      var visuals = 0;
      document.querySelectorAll(".circuitsvis-figure").forEach(function (el) {
        if (el.children.length > 0) { visuals += 1; }
      });
      document.body.setAttribute("data-plots", String(plots));
      document.body.setAttribute("data-visuals", String(visuals));
      document.body.setAttribute("data-rendered", "true");
    }, 500);
  });
})();
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { border-bottom: 1px solid #ccc; } h2 { margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 2px 6px; }
pre#report-errors:empty { display: none; } pre#report-errors { color: #b00; }
.note { color: #555; }
"""


def _inline_script(source: str) -> str:
    # An inline script ends at the first "</script", whatever the JavaScript meant by it.
    return "<script>" + source.replace("</script", "<\\/script") + "</script>"


def plotly_bundle() -> str:
    return plotly.offline.get_plotlyjs()


def circuitsvis_bundle() -> str:
    """The circuitsvis browser bundle shipped in the wheel (defines ``CircuitsVis``)."""
    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return path.read_text(encoding="utf-8")


class Page:
    """One self-contained report page."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self.uses_plotly = False
        self.uses_circuitsvis = False

    def add_heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def add_text(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def add_pre(self, text: str) -> None:
        """Preformatted text (line breaks kept, long lines wrapped)."""
        self.parts.append(f"<pre style='white-space: pre-wrap'>{html.escape(text)}</pre>")

    def add_table(self, header: list[str], rows: list[list]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows
        )
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def add_plotly(self, fig: go.Figure) -> None:
        """A plotly figure; plotly.js itself is inlined once, in the page head."""
        self.uses_plotly = True
        self.parts.append(fig.to_html(full_html=False, include_plotlyjs=False, config={"responsive": True}))

    def add_circuitsvis(self, component: str, **props) -> None:
        """A circuitsvis React component (e.g. ``"AttentionHeads"``) with its props, as
        circuitsvis's own ``.local_src`` renders it but without repeating the bundle."""
        self.uses_circuitsvis = True
        element = f"circuits-vis-{uuid.uuid4().hex[:12]}"
        call = f'CircuitsVis.render("{element}", CircuitsVis.{component}, {convert_props(props)});'
        self.parts.append(
            f'<div id="{element}" class="circuitsvis-figure" style="margin: 15px 0;"></div>' + _inline_script(call)
        )

    def render(self) -> str:
        head = [f"<meta charset='utf-8'><title>{html.escape(self.title)}</title>", f"<style>{STYLE}</style>",
                _inline_script(STATUS_SCRIPT)]
        if self.uses_plotly:
            head.append(_inline_script(plotly_bundle()))
        if self.uses_circuitsvis:
            head.append(_inline_script(circuitsvis_bundle()))
        body = [f"<h1>{html.escape(self.title)}</h1>", '<pre id="report-errors"></pre>', *self.parts]
        return "<!DOCTYPE html>\n<html><head>" + "\n".join(head) + "</head><body>\n" + "\n".join(body) + "\n</body></html>\n"

    def iframe(self, height: int = 800) -> str:
        """The page as an ``<iframe srcdoc=...>``, for a notebook's output: the page's own
        scripts and styles run inside it, apart from the notebook's."""
        return (f'<iframe srcdoc="{html.escape(self.render(), quote=True)}" '
                f'style="width: 100%; height: {height}px; border: 1px solid #ddd;"></iframe>')

    def _repr_html_(self) -> str:  # a Page as a notebook cell's last expression is drawn inline
        return self.iframe()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write(path, self.render())
        return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def heatmap(z, x=None, y=None, title: str = "", text=None, xlabel: str = "", ylabel: str = "",
            diverging: bool = True) -> go.Figure:
    """A heatmap of a 2-D array (rows are y), red-blue around zero when ``diverging``."""
    z = np.asarray(z, dtype=float)
    # String labels keep both axes categorical (plotly's template sets autotypenumbers
    # "strict"); forcing type="category" on index axes breaks heatmap drawing.
    x = [str(v) for v in (range(z.shape[1]) if x is None else x)]
    y = [str(v) for v in (range(z.shape[0]) if y is None else y)]
    kwargs = dict(colorscale="RdBu", zmid=0) if diverging else dict(colorscale="Viridis")
    trace = go.Heatmap(z=z, x=x, y=y, **kwargs)
    if text is not None:
        trace.update(text=text, texttemplate="%{text}", textfont={"size": 10})
    fig = go.Figure(trace)
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title=ylabel, height=max(300, 40 * len(z) + 150))
    fig.update_yaxes(autorange="reversed")
    return fig


def to_jsonable(value):
    """Tensors and arrays to nested lists, recursively, for results.json."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def dumps(value) -> str:
    return json.dumps(to_jsonable(value))
