"""`report.html`: one self-contained page; plots are inline base64 PNGs (matplotlib Agg).

Sections: what was measured (backend, and what it could not give), headline numbers with
bootstrap 95% intervals, reliability diagrams, OOD score histograms and ROC curves,
robustness bars, membership AUROCs, routing heatmaps. With `--compare`, a table puts every
scalar of two `eval.json` files side by side with the delta. Each plot is also written as a
PNG next to the page.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from jinja2 import Environment, select_autoescape

from trustmoe.io import atomic_write_bytes, atomic_write_text

SKIP_KEYS = {"reliability", "roc", "hist", "layers", "timing_s", "settings", "config",
             "coactivation", "tokens_per_expert", "load", "backend", "examples"}

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>trustmoe eval — {{ title }}</title>
<style>
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:right} th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.3em 0} .pos{color:#1a7f37} .neg{color:#c62828}
.small{color:#666;font-size:.85em}
</style></head><body>
<h1>trustmoe evaluation — {{ title }}</h1>
<p class="small">model {{ res.model.dir }} ({{ "{:,}".format(res.model.parameters) }} parameters,
weights sha256 {{ (res.model.weights_sha256 or "n/a")[:16] }}…) · data {{ res.data.dir }}
({{ res.data.val_documents }} held-out / {{ res.data.train_documents }} training documents) ·
seed {{ res.settings.seed }} · {{ "quick" if res.settings.quick else "full" }} mode</p>
<p>Measured through the <b>{{ res.backend.kind }}</b> backend{% if res.backend.quantize %}
({{ res.backend.quantize }} weights){% endif %}{% if res.backend.url %} at
{{ res.backend.url }} (model {{ res.backend.model }}){% endif %}.
{% if res.backend.limits %}What this backend cannot give, and what was done instead:</p>
<ul>{% for k, v in res.backend.limits.items() %}<li><b>{{ k }}</b>: {{ v }}</li>{% endfor %}</ul>
{% else %}</p>{% endif %}
<h2>Headline</h2>
<table><tr><th>metric</th><th>value</th></tr>
{% for k, v in headline %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</table>
{% if compare %}<h2>Comparison with {{ compare_title }}</h2>
<table><tr><th>metric</th><th>this</th><th>other</th><th>delta</th></tr>
{% for k, a, b, d in compare %}<tr><td>{{ k }}</td><td>{{ a }}</td><td>{{ b }}</td>
<td class="{{ 'pos' if d and d[0] != '-' else 'neg' }}">{{ d }}</td></tr>{% endfor %}</table>
{% endif %}
<h2>Multiple-choice tasks</h2>
<table><tr><th>task</th><th>n</th><th>acc</th><th>acc 95% CI</th><th>acc_norm</th>
<th>chance</th></tr>
{% for name, m in res.tasks.items() %}<tr><td>{{ name }}</td><td>{{ m.n }}</td>
<td>{{ "%.3f ± %.3f"|format(m.acc, m.acc_stderr or 0) }}</td>
<td>{{ ci(m.acc_ci95_low, m.acc_ci95_high) }}</td>
<td>{{ "%.3f ± %.3f"|format(m.acc_norm, m.acc_norm_stderr or 0) }}</td>
<td>{{ "%.3f"|format(m.chance) }}</td></tr>{% endfor %}</table>
{% for name, img in plots %}<h2>{{ name }}</h2><img alt="{{ name }}"
src="data:image/png;base64,{{ img }}">{% endfor %}
<h2>Timing</h2><table>{% for k, v in res.timing_s.items() %}<tr><td>{{ k }}</td>
<td>{{ v }} s</td></tr>{% endfor %}</table>
</body></html>
"""


def flatten(d: Any, prefix: str = "") -> dict[str, float]:
    """Scalar leaves of an eval.json as dotted paths (plot data and settings left out)."""
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            if k in SKIP_KEYS:
                continue
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, int | float) and not isinstance(d, bool):
        out[prefix] = float(d)
    return out


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.4g}"


def compare_rows(res: dict[str, Any], other: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    a, b = flatten(res), flatten(other)
    rows = []
    for k in sorted(set(a) & set(b)):
        if k.startswith(("model.", "data.")):
            continue
        d = a[k] - b[k]
        rows.append((k, _fmt(a[k]), _fmt(b[k]), f"{d:+.4g}"))
    return rows


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _reliability(res: dict[str, Any]) -> Any:
    nt = res["calibration"]["next_token"]
    panels = [("next token, T=1", nt["test_before"]),
              (f"next token, T={nt['temperature']:.2f}", nt["test_after"])]
    for name, m in list(res["calibration"].get("multiple_choice", {}).items())[:2]:
        panels.append((f"multiple choice: {name}", m))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.3), squeeze=False)
    for ax, (title, m) in zip(axes[0], panels, strict=True):
        bins = m["reliability"]
        ax.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["acc"] for b in bins],
               width=[max(b["hi"] - b["lo"], 0.02) for b in bins], edgecolor="k",
               alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.plot([b["conf"] for b in bins], [b["acc"] for b in bins], "o", ms=3, color="C3")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=title)
        ax.text(0.03, 0.9, f"ECE {m['ece_15_equal_width']:.3f}", transform=ax.transAxes)
    axes[0][0].set_ylabel("accuracy")
    return fig


def _ood_plots(res: dict[str, Any]) -> Any:
    sets = list(res["ood"].items())
    fig, axes = plt.subplots(2, len(sets), figsize=(3.6 * len(sets), 6.2), squeeze=False)
    for j, (name, r) in enumerate(sets):
        h = r["hist"]
        ax = axes[0][j]
        ax.hist(h["id"], bins=20, alpha=0.6, label="ID", density=True)
        ax.hist(h["ood"], bins=20, alpha=0.6, label="OOD", density=True)
        ax.set(title=f"{name}: {h['score']}", xlabel="ID score")
        ax.legend(fontsize=7)
        ax = axes[1][j]
        for score, m in r["scores"].items():
            ax.plot(m["roc"]["fpr"], m["roc"]["tpr"], lw=1, label=f"{score} {m['auroc']:.2f}")
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set(xlabel="FPR (OOD accepted)", ylabel="TPR (ID kept)", title="ROC, ID positive")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def _robustness_plot(res: dict[str, Any]) -> Any:
    tasks = list(res["robustness"].items())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.2), squeeze=False)
    for ax, (name, r) in zip(axes[0], tasks, strict=True):
        labels = ["original", *r["perturbations"], "worst case"]
        vals = [r["acc"], *[p["acc"] for p in r["perturbations"].values()], r["worst_case_acc"]]
        ax.bar(labels, vals, color=["C0"] + ["C1"] * len(r["perturbations"]) + ["C3"])
        ax.set(ylim=(0, 1), title=f"{name} (n={r['n']})", ylabel="accuracy")
        ax.tick_params(axis="x", rotation=35, labelsize=7)
    return fig


def _routing_plot(res: dict[str, Any]) -> Any | None:
    idr = res["moe"].get("id") or {}
    if not idr:
        return None
    layers = idr["layers"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    im = axes[0].imshow([x["load"] for x in layers], aspect="auto", cmap="viridis")
    axes[0].set(title="ID load per expert", xlabel="expert", ylabel="MoE layer",
                yticks=range(len(layers)), yticklabels=[str(x["layer"]) for x in layers],
                xticks=range(idr["num_experts"]))
    fig.colorbar(im, ax=axes[0])
    im = axes[1].imshow(layers[0]["coactivation"], cmap="magma")
    axes[1].set(title=f"co-activation P(col | row), layer {layers[0]['layer']}",
                xlabel="expert", ylabel="expert", xticks=range(idr["num_experts"]),
                yticks=range(idr["num_experts"]))
    fig.colorbar(im, ax=axes[1])
    for name, c in res["moe"].get("id_vs_ood", {}).items():
        if c:
            axes[2].plot([r["layer"] for r in c["layers"]],
                         [r["load_js_divergence"] for r in c["layers"]], "o-", label=name)
    axes[2].set(title="ID vs OOD load JS divergence", xlabel="layer", ylabel="bits")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _membership_plot(res: dict[str, Any]) -> Any:
    at = res["membership"]["attacks"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(at), [v["auroc"] for v in at.values()], color="C2")
    ax.axhline(0.5, color="k", ls=":", lw=1)
    ax.set(ylim=(0, 1), ylabel="AUROC (train vs held-out)", title="membership signals")
    return fig


def ci(lo: float | None, hi: float | None) -> str:
    """A 95% interval as text ("n/a" when not computed)."""
    if lo is None or hi is None:
        return "n/a"
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


def headline(res: dict[str, Any]) -> list[tuple[str, str]]:
    p, nt = res["perplexity"], res["calibration"]["next_token"]
    est = " (estimated from top-k)" if nt.get("estimated") else ""
    tb = nt["test_before"]
    rows = [("perplexity (95% CI)", f"{_fmt(p['perplexity'])} "
             f"{ci(p.get('perplexity_ci95_low'), p.get('perplexity_ci95_high'))}"),
            ("bits per byte", _fmt(p["bits_per_byte"])),
            (f"next-token ECE (15 bins) before → after T{est}",
             f"{_fmt(tb['ece_15_equal_width'])} {ci(tb.get('ece_ci95_low'), tb.get('ece_ci95_high'))}"
             f" → {_fmt(nt['test_after']['ece_15_equal_width'])} (T={nt['temperature']:.3f})"),
            ("next-token ECE (10 equal-mass)", _fmt(nt["all_tokens"]["ece_10_equal_mass"])),
            ("next-token Brier / NLL", f"{_fmt(nt['all_tokens']['brier'])} / "
                                       f"{_fmt(nt['all_tokens']['nll'])}")]
    for name, r in res["ood"].items():
        m = r["scores"][r["best"]]
        rows.append((f"OOD {name} (best: {r['best']})",
                     f"AUROC {_fmt(m['auroc'])} {ci(m.get('auroc_ci95_low'), m.get('auroc_ci95_high'))}"
                     f", FPR@95 {_fmt(m['fpr_at_95tpr'])}"))
    a = res["attack"]
    rows.append(("attack success rate (≤{} subs, {})".format(a["max_substitutions"],
                                                           a.get("method", "gradient")),
                 f"{_fmt(a['attack_success_rate'])} "
                 f"(acc {_fmt(a['original_accuracy'])} → {_fmt(a['accuracy_under_attack'])})"))
    rows.append(("membership best AUROC", _fmt(res["membership"]["max_auroc"])))
    ext = res["membership"].get("extraction") or {}
    if ext:
        rows.append(("verbatim extraction, training / held-out",
                     f"{_fmt(ext['members']['exact_match_rate'])} / "
                     f"{_fmt(ext['nonmembers']['exact_match_rate'])}"))
    con = res.get("contamination") or {}
    if con:
        rows.append(("task items found in training data (13-grams)",
                     f"{con['hits']} of {con['items']} (dataset audit: "
                     f"{'n/a' if con['dataset_audit_hits'] is None else con['dataset_audit_hits']})"))
    q = res.get("quantization") or {}
    if q.get("quantize"):
        rows.append((f"{q['quantize']} vs fp32 perplexity",
                     "n/a" if q["perplexity_delta"] is None else
                     f"{_fmt(q['fp32_perplexity'])} → {_fmt(p['perplexity'])} "
                     f"({100 * q['perplexity_delta']:+.3f}%)"))
    moe = res["moe"].get("id") or {}
    if moe:
        rows.append(("dead experts / router entropy", f"{_fmt(moe['dead_fraction'])} / "
                                                      f"{_fmt(moe['router_entropy'])}"))
    elif res["moe"].get("unavailable"):
        rows.append(("MoE routing", "not measured on this backend"))
    return rows


def write_report(out_dir: Path, res: dict[str, Any], other: dict[str, Any] | None = None) -> Path:
    figs = [("Reliability diagrams", "reliability.png", _reliability(res)),
            ("Out-of-distribution detection", "ood.png", _ood_plots(res)),
            ("Robustness to perturbations", "robustness.png", _robustness_plot(res)),
            ("Membership inference", "membership.png", _membership_plot(res))]
    routing = _routing_plot(res)
    if routing is not None:
        figs.append(("MoE routing", "routing.png", routing))
    plots = []
    for title, fname, fig in figs:
        data = _png(fig)
        atomic_write_bytes(out_dir / fname, data)
        plots.append((title, base64.b64encode(data).decode("ascii")))
    env = Environment(autoescape=select_autoescape(default=True))
    html = env.from_string(TEMPLATE).render(
        title=Path(res["model"]["dir"]).name, res=res, headline=headline(res), plots=plots, ci=ci,
        compare=compare_rows(res, other) if other else None,
        compare_title=(other or {}).get("model", {}).get("dir", "other"),
    )
    atomic_write_text(out_dir / "report.html", html)
    return out_dir / "report.html"
