"""`security.html`: one self-contained page of a security scan, plots inline (base64 PNG).

Sections: the summary block, canary exposure per repeat count, extraction rates on training
vs held-out text, membership-inference AUROC and TPR at 1% FPR per attack, backdoor
detector flag counts and the ranked suspects with their evidence. Error bars are the
bootstrap 95% intervals from `security.json`.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from trustmoe.io import atomic_write_text

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>trustmoe security scan</title>
<style>
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:left;vertical-align:top} th{background:#f4f4f4} img{max-width:100%}
.level-high{color:#c62828;font-weight:bold} .level-medium{color:#b26a00;font-weight:bold}
.small{color:#666;font-size:.85em} code{white-space:pre-wrap}
</style></head><body>
<h1>trustmoe security scan</h1>
<p class="small">model {{ res.model.dir }} (weights sha256 {{ (res.model.weights_sha256 or "n/a")[:16] }}…)
· data {{ res.data.dir }} (manifest {{ res.data.manifest_sha256[:16] }}…) · seed {{ res.settings.seed }}</p>
<h2>Summary — findings level
<span class="level-{{ res.summary.findings_level }}">{{ res.summary.findings_level }}</span></h2>
<table>{% for k, v in res.summary.items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}
</table>
{% for name, img in plots %}<h2>{{ name }}</h2><img alt="{{ name }}"
src="data:image/png;base64,{{ img }}">{% endfor %}
{% if res.exposure %}<h2>Canaries</h2><table><tr><th>id</th><th>repeats</th><th>exposure (bits)</th>
<th>sampled</th><th>of log2|R|</th><th>method</th><th>extracted</th></tr>
{% for c in res.exposure.canaries %}<tr><td>{{ c.id }}</td><td>{{ c.repeats }}</td>
<td>{{ "%.2f"|format(c.exposure) }}</td><td>{{ "%.2f"|format(c.exposure_sampled) }}</td>
<td>{{ c.log2_space }}</td><td>{{ c.method }}</td><td>{{ c.extracted }}</td></tr>{% endfor %}
</table>{% endif %}
{% if res.backdoor %}<h2>Backdoor suspects ({{ res.backdoor.suspect_count }})</h2>
<p class="small">Each detector flags a chunk when its p-value against {{ res.backdoor.null.chunks
}} held-out chunks is ≤ {{ res.backdoor.target_fpr }} (its false-positive rate on clean text).
{% if res.backdoor.null.trigger_search_to_beat is number %}For the trigger search that means a
score above {{ res.backdoor.null.trigger_search_to_beat }}.{% endif %}
{% if res.backdoor.note %}{{ res.backdoor.note }}{% endif %}</p>
<table><tr><th>chunk</th><th>flagged by</th><th>p-values</th><th>evidence</th></tr>
{% for s in res.backdoor.suspects[:30] %}<tr><td>{{ s.chunk }}</td>
<td>{{ s.flagged_by|join(", ") }}</td><td>{{ s.p }}</td>
<td>{% if s.evidence %}trigger <code>{{ s.evidence.trigger }}</code> → payload <code>{{ s.evidence.payload
}}</code> (of <code>{{ s.evidence.continuation }}</code>; score {{ s.evidence.score }};
ΔNLL {{ s.evidence.delta_nll }} nats:
{{ s.evidence.nll_without_trigger }} without the trigger, {{ s.evidence.nll_with_trigger }} with
it; in {{ s.evidence.chunks_with_same_trigger }} chunks)
{% endif %}</td></tr>{% endfor %}</table>{% endif %}
<h2>Timing</h2><table>{% for k, v in res.timing_s.items() %}<tr><td>{{ k }}</td>
<td>{{ v }} s</td></tr>{% endfor %}</table>
<p class="small">Every figure with its bootstrap 95% interval is in security.json.</p>
</body></html>
"""


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _bars(ax: Any, labels: list[str], figs: list[dict[str, Any]], color: str = "#4477aa") -> None:
    vals = [f["value"] or 0.0 for f in figs]
    lo = [max(0.0, v - (f["ci95"][0] if f["ci95"][0] is not None else v)) for v, f in zip(
        vals, figs, strict=True)]
    hi = [max(0.0, (f["ci95"][1] if f["ci95"][1] is not None else v) - v) for v, f in zip(
        vals, figs, strict=True)]
    ax.bar(labels, vals, yerr=[lo, hi], capsize=4, color=color)


def plots(res: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    if res.get("exposure"):
        by = res["exposure"]["by_repeats"]
        fig, ax = plt.subplots(figsize=(5, 3))
        keys = sorted(by, key=int)
        _bars(ax, [f"×{k}" for k in keys], [by[k]["exposure"] for k in keys])
        ax.axhline(by[keys[0]]["log2_space"], ls="--", c="gray", label="log2|R| (fully exposed)")
        ax.set_ylabel("exposure (bits)")
        ax.set_xlabel("canary repeats")
        ax.legend(fontsize=8)
        out.append(("Canary exposure by repeat count", _png(fig)))
    if res.get("membership"):
        at = res["membership"]["attacks"]
        fig, axs = plt.subplots(1, 2, figsize=(9, 3))
        names = list(at)
        _bars(axs[0], names, [at[a]["auroc"] for a in names])
        axs[0].axhline(0.5, ls="--", c="gray")
        axs[0].set_ylabel("AUROC")
        _bars(axs[1], names, [at[a]["tpr_at_1pct_fpr"] for a in names], "#aa3377")
        axs[1].axhline(0.01, ls="--", c="gray")
        axs[1].set_ylabel("TPR at 1% FPR")
        for a in axs:
            a.tick_params(axis="x", rotation=30)
        out.append(("Membership inference", _png(fig)))
    if res.get("extraction"):
        ex = res["extraction"]
        fig, ax = plt.subplots(figsize=(5, 3))
        labels = ["train exact", "held-out exact", "train near", "held-out near"]
        figs = [ex["train"]["exact_rate"], ex["heldout"]["exact_rate"],
                ex["train"]["near_rate"], ex["heldout"]["near_rate"]]
        _bars(ax, labels, figs, "#228833")
        ax.set_ylabel("share of prefixes")
        ax.tick_params(axis="x", rotation=20)
        out.append(("Extraction (greedy suffix)", _png(fig)))
    if res.get("backdoor"):
        b = res["backdoor"]
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(list(b["flagged"]), list(b["flagged"].values()), color="#cc6677")
        ax.set_ylabel(f"chunks flagged (of {b['chunks']})")
        ax.tick_params(axis="x", rotation=20)
        out.append(("Backdoor detectors", _png(fig)))
    return out


def write_report(out_dir: Path, res: dict[str, Any]) -> Path:
    from jinja2 import Environment, select_autoescape

    env = Environment(autoescape=select_autoescape(default=True))
    page = env.from_string(TEMPLATE).render(res=res, plots=plots(res))
    path = Path(out_dir) / "security.html"
    atomic_write_text(path, page)
    return path
