"""``hymba-batch report OUTPUT_URI``: one self-contained HTML page about a job (its PNG plots
embedded), from the output prefix alone (``pipeline/report_data.py`` reads it): rows/s and
tokens/s over time per actor, prompt and completion length histograms, finish reasons, errors
by kind with sample rows, quarantined units, and the time split (start, steady state, tail).

Plots are drawn with matplotlib (headless Agg backend): a well-kept library whose PNGs every
browser and mail client shows, rather than SVG drawn by hand. The page is rendered by jinja2
with autoescaping (error messages come from the data). Written to ``OUTPUT_URI/_hymba/report.html``
unless another local path or ``s3://`` URI is given.
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

import jinja2
import matplotlib
from markupsafe import Markup

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

from hymba_batch.pipeline.fs import resolve, write_atomic  # noqa: E402
from hymba_batch.pipeline.report_data import ReportData, load  # noqa: E402

REPORT_FILE = "report.html"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def rate_series(points: list[dict[str, Any]], key: str) -> tuple[list[float], dict[str, list[float]]]:
    """(edges: seconds since the run's first point, per actor and ``all``: ``key`` per second in
    each interval between two points) from the cumulative points of one run."""
    points = [p for i, p in enumerate(points) if i == 0 or p["t"] > points[i - 1]["t"]]
    if len(points) < 2:
        return [], {}
    t0 = points[0]["t"]
    edges = [p["t"] - t0 for p in points]
    actors = sorted({a for p in points for a in p.get("actors", {})})
    out: dict[str, list[float]] = {}
    for prev, cur in zip(points, points[1:]):
        dt = cur["t"] - prev["t"]
        for name in actors + ["all"]:
            if name == "all":
                a, b = prev.get(key, 0), cur.get(key, 0)
            else:
                a = prev.get("actors", {}).get(name, {}).get(key, 0)
                b = cur.get("actors", {}).get(name, {}).get(key, 0)
            out.setdefault(name, []).append(max(b - a, 0) / dt)
    return edges, out


def _rates_figure(data: ReportData) -> str | None:
    runs = (data.history or {}).get("runs") or []
    points = runs[-1]["points"] if runs else []
    edges, rows = rate_series(points, "rows")
    _, toks = rate_series(points, "completion_tokens")
    if not rows:
        return None
    minutes = edges[-1] > 180
    xs = [e / 60 for e in edges] if minutes else edges
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, series, what in ((axes[0], rows, "rows/s"), (axes[1], toks, "generated tokens/s")):
        for name, ys in series.items():
            ax.stairs(ys, xs, label="all actors" if name == "all" else f"actor {name}",
                      linewidth=2.2 if name == "all" else 1.2, color="black" if name == "all" else None)
        ax.set_xlabel(f"{'minutes' if minutes else 'seconds'} since the run started")
        ax.set_ylabel(what)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _png(fig)


def _lengths_figure(data: ReportData) -> str | None:
    if not data.prompt_lengths:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    for ax, values, what in ((axes[0], data.prompt_lengths, "prompt tokens"),
                             (axes[1], data.completion_lengths, "completion tokens")):
        ax.hist(values, bins=min(40, max(5, len(set(values)))), color="#4c72b0")
        ax.set_xlabel(what)
        ax.set_ylabel("rows")
        ax.grid(alpha=0.3)
    return _png(fig)


def _finish_figure(data: ReportData) -> str | None:
    if not data.finish_reasons:
        return None
    names = list(data.finish_reasons)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(names)))
    ax.barh(names, [data.finish_reasons[n] for n in names], color="#55a868")
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    return _png(fig)


def _phases_figure(data: ReportData) -> str | None:
    p = data.phases
    parts = [("start", p.start_s, "#c44e52"), ("steady state", p.steady_s, "#4c72b0"), ("tail", p.tail_s, "#dd8452"),
             ("commit", p.commit_s, "#8172b3")]
    parts = [x for x in parts if x[1]]
    if not parts:
        return None
    fig, ax = plt.subplots(figsize=(11, 1.2))
    left = 0.0
    for name, secs, color in parts:
        ax.barh([0], [secs], left=left, color=color, label=f"{name}: {secs:.1f} s")
        left += secs
    ax.set_yticks([])
    ax.set_xlabel("seconds")
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.6))
    return _png(fig)


PAGE = jinja2.Environment(autoescape=True).from_string("""<!doctype html>
<html><head><meta charset="utf-8"><title>hymba-batch report: {{ s.job_id }}</title>
<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}td,th{padding:2px 10px;text-align:left}
th{background:#eee}table{border-collapse:collapse;margin:1em 0}tr:nth-child(even){background:#f7f7f7}
code{font-size:90%}.state-succeeded{color:#2a7}.state-failed,.state-dead{color:#c33}</style></head><body>
<h1>Job {{ s.job_id }}: <span class="state-{{ s.state }}">{{ s.state }}</span></h1>
<p>{{ s.output_uri }}{% if not s.manifested %} (no manifest: the figures cover the committed files){% endif %}.
Report written {{ written }}.</p>
<table>
<tr><th>rows committed / input</th><td>{{ s.committed_rows }} / {{ s.total_rows }}</td></tr>
<tr><th>rows with an error</th><td>{{ s.error_rows }}</td></tr>
<tr><th>units committed / planned</th><td>{{ s.committed_units }} / {{ s.total_units if s.total_units is not none else "?" }}</td></tr>
<tr><th>tokens in / out</th><td>{{ s.prompt_tokens }} / {{ s.completion_tokens }}</td></tr>
{% for name, secs in phase_rows %}<tr><th>{{ name }}</th><td>{{ secs }}</td></tr>{% endfor %}
</table>
<h2>Throughput over time</h2>
{% if figs.rates %}<img alt="rows/s and tokens/s per actor" src="data:image/png;base64,{{ figs.rates }}">
{% else %}<p>No history with two points or more (<code>_hymba/history.json</code>).</p>{% endif %}
<h2>Time split</h2>
{% if figs.phases %}<img alt="start, steady state, tail" src="data:image/png;base64,{{ figs.phases }}">
{% else %}<p>No history of the run's phases.</p>{% endif %}
<h2>Prompt and completion lengths</h2>
{% if figs.lengths %}<img alt="length histograms" src="data:image/png;base64,{{ figs.lengths }}">
{% else %}<p>No row generated yet.</p>{% endif %}
<h2>Finish reasons</h2>
{% if figs.finish %}<img alt="finish reasons" src="data:image/png;base64,{{ figs.finish }}">{% endif %}
<table><tr><th>finish reason</th><th>rows</th></tr>
{% for k, v in s.finish_reasons.items() %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</table>
<h2>Errors</h2>
{% if s.failed_units %}<h3>Quarantined units</h3><table><tr><th>unit</th><th>rows</th><th>tries</th><th>error</th></tr>
{% for f in s.failed_units %}<tr><td><code>{{ f.unit_id }}</code></td><td>{{ f.rows }}</td><td>{{ f.attempts }}</td>
<td>{{ f.error }}</td></tr>{% endfor %}</table>{% endif %}
{% if s.errors %}<h3>Row errors by kind</h3><table><tr><th>kind</th><th>rows</th><th>sample rows (file, row: error)</th></tr>
{% for e in s.errors %}<tr><td>{{ e.kind }}</td><td>{{ e.rows }}</td><td>{% for x in e.samples %}
<div><code>{{ x.source_file }}</code>, row {{ x.source_row }}: {{ x.error }}</div>{% endfor %}</td></tr>{% endfor %}
</table>{% elif not s.failed_units %}<p>No errors.</p>{% endif %}
<script type="application/json" id="hymba-report-data">{{ data_json }}</script>
</body></html>
""")


def render(data: ReportData) -> str:
    """The report page of ``data`` (HTML, plots embedded)."""
    s = data.summary()
    p = data.phases
    phase_rows = [(name, f"{v:.1f} s") for name, v in (
        ("time in all", p.total_s), ("start (planning, Ray, actors loading)", p.start_s),
        ("steady state (every actor busy)", p.steady_s), ("tail (an actor out of work)", p.tail_s),
        ("commit", p.commit_s)) if v is not None]
    figs = {"rates": _rates_figure(data), "lengths": _lengths_figure(data), "finish": _finish_figure(data),
            "phases": _phases_figure(data)}
    # inside <script>: no "</" may close the element early
    data_json = Markup(json.dumps(s, default=str).replace("</", "<\\/"))
    return PAGE.render(s=s, figs=figs, phase_rows=phase_rows, data_json=data_json,
                       written=time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()))


def write_report(uri: str, dest: str | None = None) -> str:
    """Write the report of the job in ``uri`` to ``dest`` (default ``uri/_hymba/report.html``);
    returns where it went."""
    data = load(uri)
    html = render(data).encode()
    loc = resolve(dest) if dest else resolve(uri)
    path = loc.path if dest else loc.join("_hymba", REPORT_FILE)
    write_atomic(loc, path, lambda f: f.write(html), loc.join("_hymba", "tmp") if not dest else loc.path + ".tmp")
    return loc.uri(path)
