"""`audit.html`: one self-contained page a person reads after `trustmoe data build`.

It starts with the audit at a glance (each check: what it found, what the build did, what to
do), then one section per check that says what its findings mean. The poisoning screen's
leads come first; known boilerplate (licence headers, generated tables) is counted and folded
away beneath them, not shown as an alarm. Every value is autoescaped by jinja2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trustmoe.data import explain
from trustmoe.io import atomic_write_text

MAX_ROWS = 50  # findings listed per table


def render(audit: dict[str, Any], stats: dict[str, Any]) -> str:
    from jinja2 import Environment

    c = audit.get("counts", {})
    mode = explain.pii_mode(audit)
    poison = explain.rank_poisoning(audit.get("poisoning", []))
    dropped = [(rule, n, explain.RULES.get(rule, rule.replace("_", " ")))
               for rule, n in sorted(c.get("dropped_by_rule", {}).items(), key=lambda kv: -kv[1])]
    env = Environment(autoescape=True)
    env.filters["docs"] = _docs
    return env.from_string(_HTML).render(
        stats=stats, audit=audit, counts=c, rows=explain.glance(audit), dropped=dropped,
        changed=c.get("changed", {}), pii_types=explain.pii_by_type(audit.get("pii", [])),
        pii_action=explain.pii_action(mode), pii_todo=explain.pii_what_to_do(mode),
        poison=poison, kinds=explain.POISON_KINDS, poison_todo=explain.POISON_WHAT_TO_DO,
        boilerplate=explain.BOILERPLATE, change_names=explain.CHANGES,
        meaning=explain.poison_kind_meaning, max_rows=MAX_ROWS)


def write(path: Path, audit: dict[str, Any], stats: dict[str, Any]) -> None:
    atomic_write_text(path, render(audit, stats))


def _docs(documents: list[str], show: int = 4) -> str:
    docs = [str(d) for d in documents]
    more = f" and {len(docs) - show} more" if len(docs) > show else ""
    return ", ".join(docs[:show]) + more


_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>trustmoe data audit</title>
<style>body{font-family:sans-serif;max-width:64em;margin:2em auto;line-height:1.4}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;vertical-align:top}.review{background:#fff4d6}.note{color:#444}
code{font-size:90%;word-break:break-word}details{margin:.5em 0}</style></head><body>
<h1>Data audit</h1>
<p><b>{{ counts.kept }} of {{ counts.documents }} documents kept</b>, {{ counts.dropped }}
dropped{% for k, v in changed.items() %}; {{ v }} {{ change_names.get(k, k.replace("_", " ")) }}
{%- endfor %}.
Tokens: train {{ stats.tokens.train }}, validation {{ stats.tokens.val }}.
Screens that only report (PII in <code>keep</code> mode, poisoning) never drop anything;
every dropped document is counted under <a href="#dropped">Dropped documents</a>.</p>

<h2>At a glance</h2>
<table><tr><th>check</th><th>found</th><th>what the build did</th><th>what to do</th></tr>
{% for r in rows %}<tr{% if r.review %} class="review"{% endif %}><th>{{ r.check }}</th>
<td>{{ r.found }}</td><td>{{ r.done }}</td><td>{{ r.todo }}</td></tr>
{% endfor %}</table>
<p class="note">Highlighted rows need a person to look.</p>

<h2 id="dropped">Dropped documents</h2>
{% if dropped %}<table><tr><th>rule</th><th>documents</th><th>why a document is dropped</th></tr>
{% for rule, n, why in dropped %}<tr><th>{{ rule }}</th><td>{{ n }}</td><td>{{ why }}</td></tr>
{% endfor %}</table>
<p class="note">Each file's fate and rule is in <code>manifest.json</code>.</p>
{% else %}<p>None.</p>{% endif %}

<h2 id="pii">PII and secrets</h2>
{% if pii_types %}
<p>{{ audit.pii|length }} findings: {{ pii_action }}. {{ pii_todo }}</p>
<table><tr><th>type</th><th>what it is</th><th>findings</th><th>documents</th>
<th>most in</th></tr>
{% for t in pii_types %}<tr{% if t.type == "KEY" %} class="review"{% endif %}>
<th>{{ t.type }}</th><td>{{ t.meaning }}</td><td>{{ t.findings }}</td><td>{{ t.documents }}</td>
<td>{% for d, n in t.top_documents %}{{ d }} ({{ n }}){% if not loop.last %}, {% endif %}
{% endfor %}</td></tr>{% endfor %}</table>
<details><summary>The first {{ [audit.pii|length, max_rows]|min }} findings (values masked)
</summary><table><tr><th>document</th><th>type</th><th>characters</th><th>masked</th></tr>
{% for p in audit.pii[:max_rows] %}<tr><td>{{ p.document }}</td><td>{{ p.type }}</td>
<td>{{ p.span|join("–") }}</td><td><code>{{ p.masked }}</code></td></tr>{% endfor %}
</table></details>
{% else %}<p>None found (e-mail and IP addresses, phone, card and IBAN numbers, private keys
and API tokens are screened).</p>{% endif %}

<h2 id="poisoning">Poisoning screen</h2>
<p>The screen looks for text planted across files to teach a model a hidden behaviour:</p>
<ul>{% for k, v in kinds.items() %}<li><b>{{ k }}</b>: {{ v }}.</li>{% endfor %}</ul>
<p>It found {{ poison.leads|length }} lead(s) to review
{%- if poison.boilerplate %} and {{ poison.boilerplate|length }} known boilerplate
({% for k, n in poison.by_boilerplate.items() %}{{ n }} {{ k }}{% if not loop.last %},
{% endif %}{% endfor %}){% endif %}. {{ poison_todo }}</p>
{% if poison.leads %}<h3>Leads to review</h3>
<p class="note">Most suspicious first: patterns spread over several folders, then those
within one package (most often code that package shares).</p>
<table><tr><th>kind</th><th>score</th><th>pattern</th><th>documents</th></tr>
{% for f in poison.leads[:max_rows] %}<tr><td title="{{ meaning(f) }}">{{ f.kind }}</td>
<td>{{ f.score }}</td><td><code>{{ f.pattern }}</code></td>
<td>{{ f.documents|length }}: {{ f.documents|docs }}{% if f.within_package %}
<br><small>all in {{ f.within_package }}</small>{% endif %}</td></tr>{% endfor %}</table>
{% endif %}
{% if poison.boilerplate %}<details><summary>Known boilerplate: {{ poison.boilerplate|length }}
findings that match licence headers or generated tables; no action needed</summary>
<ul>{% for k, v in boilerplate.items() %}<li><b>{{ k }}</b>: {{ v }}.</li>{% endfor %}</ul>
<table><tr><th>why it is boilerplate</th><th>kind</th><th>pattern</th>
<th>documents</th></tr>
{% for f in poison.boilerplate[:max_rows] %}<tr><td>{{ f.boilerplate_kind }}</td>
<td>{{ f.kind }}</td><td><code>{{ f.pattern }}</code></td>
<td>{{ f.documents|length }}: {{ f.documents|docs }}</td></tr>{% endfor %}</table></details>
{% endif %}

<h2 id="contamination">Evaluation-set contamination</h2>
{% if audit.contamination %}<p>Items of the given evaluation sets whose word n-grams occur
in training documents: scores on them would measure memory, not skill.</p>
<table><tr><th>eval item</th><th>documents</th></tr>
{% for c in audit.contamination[:max_rows] %}<tr><td>{{ c.eval_set }}#{{ c.item }}</td>
<td>{{ c.documents|docs }}</td></tr>{% endfor %}</table>
{% elif audit.contamination_index %}<p>None: no item of the
{{ audit.contamination_index["items"] }} evaluation items occurs in the training text.</p>
{% else %}<p>Not checked: pass the test sets you will report on with
<code>--eval-set</code>.</p>{% endif %}

<h2 id="near">Near-duplicate clusters</h2>
{% if audit.near_duplicates %}<p>Documents that are nearly the same text; the first of each
cluster was kept and the rest dropped, so no text is weighted several times.</p><ul>
{% for c in audit.near_duplicates[:max_rows] %}<li>{{ c.documents|docs(6) }}</li>{% endfor %}
</ul>{% else %}<p>None.</p>{% endif %}

<h2 id="licences">Licences</h2>
<table><tr><th>licence (SPDX)</th><th>documents</th></tr>
{% for k, v in audit.licenses.counts.items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>
{% endfor %}</table>
{% if audit.licenses.undetermined %}<p class="review">{{ audit.licenses.undetermined|length }}
document(s) have no licence the build could determine; declare one with
<code>--license</code>.</p>{% endif %}
</body></html>
"""
