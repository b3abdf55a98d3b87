"""infra/grafana/hymba-batch.json: every query (panels and the ``job`` variable) names only
metrics the code exports (``workers/metrics.py``, under the names Ray's Prometheus export gives
them), every exported metric is on some panel, and the dashboard is well formed for Grafana's
import (unique panel ids, a Prometheus datasource variable, panels inside the 24-column grid)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hymba_batch.workers.metrics import METRICS, prometheus_name

DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "hymba-batch.json"
NAME = re.compile(r"\b(ray_hymba_[a-z0-9_]+)\b")
EXPORTED = {prometheus_name(n) for n in METRICS}


def _queries(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable."""
    out = [(f"panel {p['title']!r}", t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']!r}", q))
    return out


def _balanced(expr: str) -> bool:
    depth = {"(": 0, "{": 0, "[": 0}
    close = {")": "(", "}": "{", "]": "["}
    for ch in re.sub(r'"[^"]*"', "", expr):
        if ch in depth:
            depth[ch] += 1
        elif ch in close:
            depth[close[ch]] -= 1
            if depth[close[ch]] < 0:
                return False
    return not any(depth.values())


def test_every_query_names_an_exported_metric_and_every_metric_is_shown() -> None:
    dash = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for where, expr in _queries(dash):
        names = set(NAME.findall(expr))
        assert names, f"{where}: {expr!r} names no hymba metric"
        assert names <= EXPORTED, f"{where}: {sorted(names - EXPORTED)} are not exported by workers/metrics.py"
        assert _balanced(expr), f"{where}: unbalanced brackets in {expr!r}"
        used |= names
    assert EXPORTED <= used, f"exported but on no panel: {sorted(EXPORTED - used)}"


def test_counters_are_rated_and_gauges_are_not() -> None:
    """A counter's raw value only grows (and resets when an actor restarts): panels show its
    rate, increase or max over the range; a gauge is never rated."""
    dash = json.loads(DASHBOARD.read_text())
    for where, expr in _queries(dash):
        if where.startswith("variable"):
            continue
        for m in re.finditer(r"(\w+)\(\s*(ray_hymba_[a-z0-9_]+)", expr):
            fn, name = m.groups()
            if name.endswith("_total"):
                assert fn in ("rate", "increase", "max_over_time"), f"{where}: {fn}({name}) of a counter"
            else:
                assert fn not in ("rate", "increase"), f"{where}: {fn}({name}) of a gauge"


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert all('job=~"$job"' in t["expr"] for t in p["targets"]), f"{p['title']}: not filtered by $job"
