"""The loss curve of a run as one self-contained HTML file (plotly.js inlined)."""

from pathlib import Path

from .rundir import read_metrics


def write_loss_curve(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Train and validation loss against tokens seen, written to ``RUN/loss_curve.html``."""
    import plotly.graph_objects as go

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    fig = go.Figure()
    for key, name in (("train_loss", "train"), ("val_loss", "validation")):
        pts = [(r["tokens_seen"], r[key]) for r in rows if r.get(key) is not None]
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=name,
                                 mode="lines" if key == "train_loss" else "lines+markers"))
    fig.update_layout(title=f"Loss: {run_dir.name}", xaxis_title="tokens seen",
                      yaxis_title="cross-entropy (nats/token)", template="plotly_white")
    out = Path(out) if out else run_dir / "loss_curve.html"
    fig.write_html(out, include_plotlyjs=True, full_html=True)
    return out
