"""`/dashboard` (HTML) and `/dashboard/status.json`: what the live monitor sees.

One self-contained page, no scripts from anywhere (the server may have no internet): served
versions with their lineage, registry aliases and their history, per version and detector the
statistic of every window against its threshold (inline SVG drawn here), SLOs, and incidents
with the action taken. The page reloads itself every `refresh_s` seconds; status.json is the
same data for machines (`LiveMonitor.status()`).
"""

from __future__ import annotations

import html
import math
import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse

W, H, PAD = 420, 130, 28  # plot size in px
VERSION_COLS = ["version", "role", "traffic", "digest", "dataset manifest", "eval (profile)", "requests",
                "drift windows", "monitor"]
ALIAS_COLS = ["model", "alias", "#", "action", "holder", "when, by", "why"]
SLO_COLS = ["version", "limit", "allowed", "last window", "windows", "pending"]
INCIDENT_COLS = ["opened", "id", "version", "detector", "statistic vs threshold", "action", "what was done",
                 "status", "lineage"]


def router(status: Any, refresh_s: int = 10) -> APIRouter:
    """Routes over `status()` (e.g. `LiveMonitor.status`)."""
    r = APIRouter()

    @r.get("/dashboard/status.json")
    def status_json() -> JSONResponse:
        return JSONResponse(status())

    @r.get("/dashboard", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(render(status(), refresh_s))

    return r


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _num(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}"
    return _e(x)


def _when(t: Any) -> str:
    if not isinstance(t, int | float):
        return _e(t)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def plot(name: str, history: list[dict[str, Any]], version: str = "") -> str:
    """Inline SVG: the statistic per window (line, crossed windows red) and its threshold (dashed)."""
    pts = [(i, h.get("statistic"), h.get("threshold"), h.get("crossed")) for i, h in enumerate(history)]
    vals = [v for _, s, t, _ in pts for v in (s, t) if isinstance(v, int | float) and math.isfinite(v)]
    label = f'<text x="{PAD}" y="14" class="t">{_e(name)}</text>'
    svg = f'<svg class="plot" data-version="{_e(version)}" data-detector="{_e(name)}" width="{W}" height="{H}"'
    if not vals:
        return (f'{svg} role="img">{label}'
                f'<text x="{W // 2}" y="{H // 2}" text-anchor="middle" class="m">no window yet</text></svg>')
    lo, hi = min(0.0, *vals), max(vals)
    hi = hi if hi > lo else lo + 1.0
    n = max(len(pts) - 1, 1)

    def xy(i: int, v: float) -> str:
        x = PAD + (W - 2 * PAD) * (i / n if len(pts) > 1 else 0.5)
        y = H - PAD - (H - 2 * PAD) * (v - lo) / (hi - lo)
        return f"{x:.1f},{y:.1f}"

    stat = " ".join(xy(i, s) for i, s, _, _ in pts if isinstance(s, int | float) and math.isfinite(s))
    thr = " ".join(xy(i, t) for i, _, t, _ in pts if isinstance(t, int | float) and math.isfinite(t))
    if len(pts) == 1 and thr:  # one window: the threshold as a level, the statistic as a dot
        y = thr.split(",")[1]
        thr = f"{PAD},{y} {W - PAD},{y}"
    dots = "".join(f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="2.5" class="pt"/>'
                   for p in stat.split())
    dots += "".join(f'<circle cx="{xy(i, s).split(",")[0]}" cy="{xy(i, s).split(",")[1]}" r="3.5" class="x"/>'
                   for i, s, _, c in pts if c and isinstance(s, int | float) and math.isfinite(s))
    axes = (f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" class="ax"/>'
            f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" class="ax"/>'
            f'<text x="2" y="{PAD + 4}" class="m">{hi:.3g}</text><text x="2" y="{H - PAD}" class="m">{lo:.3g}</text>'
            f'<text x="{W - PAD}" y="{H - 8}" text-anchor="end" class="m">window {len(pts)}</text>')
    return (f'{svg} role="img" '
            f'aria-label="{_e(name)} statistic per window and its threshold">{label}{axes}'
            f'<polyline points="{thr}" class="thr"/><polyline points="{stat}" class="st"/>{dots}</svg>')


CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;
vertical-align:top}th{background:#f3f3f3}code{font-size:12px}.ok{color:#1a7f37}.bad{color:#c0392b;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:14px}.card{border:1px solid #ddd;padding:6px;max-width:440px}
.card p{font-size:12px;color:#444;margin:.3em 0}
svg .st{fill:none;stroke:#1f5fbf;stroke-width:2}svg .thr{fill:none;stroke:#c0392b;stroke-width:1.5;
stroke-dasharray:6 4}svg .x{fill:#c0392b}svg .pt{fill:#1f5fbf}svg .ax{stroke:#999}svg .t{font-size:12px;font-weight:600}
svg .m{font-size:10px;fill:#666}
"""


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    if not rows:
        return "<p>none</p>"
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{th}</tr>{body}</table>'


def render(st: dict[str, Any], refresh_s: int = 10) -> str:
    watched = st.get("versions", {})
    served = st.get("served", [])
    canary = st.get("canary_percent")
    rows = []
    for v in served:
        w = watched.get(v["key"], {})
        why = st.get("queue", {}).get("not_watched", {}).get(v["key"])
        rows.append([f"<code>{_e(v['key'])}</code>", _e(v.get("role")),
                     f"{_num(canary)}%" if v.get("role") == "canary" else "",
                     f"<code>{_e(str(v.get('digest'))[:12])}</code>",
                     f"<code>{_e(str(v.get('dataset_manifest_sha256') or '–')[:12])}</code>",
                     _e(v.get("eval_dir")), _num(w.get("requests")), _num(w.get("windows")),
                     '<span class="ok">watched</span>' if w else f'<span class="bad">not watched</span>: {_e(why)}'])
    parts = [f"<h2>Versions</h2>{_table(VERSION_COLS, rows, 'versions')}"]

    arows = []
    for name, a in sorted(st.get("aliases", {}).items()):
        if "error" in a:
            arows.append([_e(name), "", "", "", "", "", _e(a["error"])])
            continue
        for ev in reversed(a.get("history", [])):
            arows.append([_e(name), _e(ev["alias"]), _num(ev["seq"]), _e(ev["action"]),
                          f"v{_e(ev['previous_version'])} → v{_e(ev['version'])}",
                          _e(ev["at"][:19]) + " " + _e(ev["by"]),
                          _e(ev["why"])])
    cur = "; ".join(f"{_e(n)}: " + ", ".join(f"{_e(k)} → v{_e(v)}" for k, v in a.get("current", {}).items())
                    for n, a in sorted(st.get("aliases", {}).items()))
    parts.append(f"<h2>Aliases</h2><p>{cur or 'not served from a registry'}</p>"
                 f"{_table(ALIAS_COLS, arows, 'aliases')}")

    pol = st.get("policy", {})
    parts.append(f"<h2>Detectors</h2><p>Windows of {_num(pol.get('window'))} requests per version. Each "
                 f"drift threshold is set so that a version that has not drifted raises a false alarm about "
                 f"once every {_num(pol.get('ert_requests'))} requests (the expected run time, ERT); an alarm "
                 f"also needs the effect to exceed its floor and {_num(pol.get('consecutive'))} windows in a "
                 f"row. Blue: the statistic of each window; dashed red: its threshold; red dots: windows that "
                 f"crossed. Detectors that act: {_e(', '.join(pol.get('act', [])))} → {_e(pol.get('action'))}.</p>")
    for key, w in watched.items():
        cards = []
        for name, d in w.get("detectors", {}).items():
            svg = plot(name, d.get("history", []), key)
            cards.append(f'<div class="card">{svg}<p>{_e(d.get("explain"))}</p></div>')
        parts.append(f'<h3><code>{_e(key)}</code> ({_e(w.get("info", {}).get("role"))})</h3>'
                     f'<div class="plots">{"".join(cards)}</div>')

    srows = []
    for key, w in watched.items():
        slo = w.get("slo", {})
        last = slo.get("last") or {}
        for lim, val in (slo.get("limits") or {}).items():
            got = last.get(lim) if isinstance(last, dict) else None
            got = got.get("statistic") if isinstance(got, dict) else got
            bad = isinstance(got, int | float) and got > val
            shown = "inconclusive" if isinstance(last, dict) and lim in last and got is None else _num(got)
            srows.append([f"<code>{_e(key)}</code>", _e(lim), _num(val),
                          f'<span class="{"bad" if bad else "ok"}">{shown}</span>',
                          _num(slo.get("windows")), _num(slo.get("pending"))])
    parts.append(f"<h2>SLOs</h2>{_table(SLO_COLS, srows, 'slos')}")

    irows = []
    for i in st.get("incidents", []):
        irows.append([_when(i.get("opened_at")), f"<code>{_e(i.get('id'))}</code>",
                      f"<code>{_e(i.get('version'))}</code>",
                      _e(i.get("detector")), f"{_num(i.get('statistic'))} vs {_num(i.get('threshold'))}",
                      _e(i.get("action")), _e(i.get("action_result")), _e(i.get("status")),
                      f"digest <code>{_e(str(i.get('digest'))[:12])}</code><br>data <code>"
                      f"{_e(str(i.get('dataset_manifest_sha256'))[:12])}</code><br>profile {_e(i.get('profile_ref'))}"])
    parts.append(f"<h2>Incidents</h2>{_table(INCIDENT_COLS, irows, 'incidents')}")
    q = st.get("queue", {})
    parts.append(f"<p>Monitor queue: {_num(q.get('waiting'))} waiting, {_num(q.get('observed'))} observed, "
                 f"{_num(q.get('dropped'))} dropped, {_num(q.get('failed'))} failed. "
                 f'<a href="/dashboard/status.json">status.json</a></p>')
    return (f'<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{int(refresh_s)}">'
            f"<title>trustmoe monitor</title><style>{CSS}</style></head><body><h1>trustmoe monitor</h1>"
            f"{''.join(parts)}</body></html>")
