"""How `trustmoe registry` prints: tables, one version's detail, gate reports, progress."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table


class _Out:
    """stdout as a rich Console made at print time: full-width tables when piped or logged
    (rich would cut them to 80 columns), the terminal's width otherwise."""

    def print(self, *args: Any, **kw: Any) -> None:
        Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(*args, **kw)


console = _Out()


def _short(digest: str | None, n: int = 12) -> str:
    return f"{digest[:n]}..." if digest else "-"


def _when(iso_time: str) -> str:
    return iso_time.replace("T", " ")[:19] + "Z"


def models_table(models: list[dict[str, Any]]) -> None:
    if not models:
        console.print("the registry is empty (`trustmoe registry add MODEL_DIR --name N`)")
        return
    t = Table("name", "versions", "latest", "aliases", "created")
    for m in models:
        aliases = ", ".join(f"{a} -> v{v}" for a, v in m["aliases"].items()) or "-"
        t.add_row(m["name"], str(m["versions"]), f"v{m['latest']}", aliases, _when(m["created_at"]))
    console.print(t)


def versions_table(versions: list[dict[str, Any]], title: str) -> None:
    if not versions:
        console.print(f"{title}: nothing")
        return
    t = Table("name", "version", "digest", "aliases", "perplexity", "ece", "registered", "by",
              "why", title=title)
    for v in versions:
        met = v["metadata"].get("metrics", {})
        t.add_row(v["name"], f"v{v['version']}", _short(v["digest"]), ", ".join(v["aliases"]) or "-",
                  _num(met.get("perplexity")), _num(met.get("ece")), _when(v["created_at"]),
                  v["created_by"], v["why"] or "-")
    console.print(t)


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, int | float) else "-"


def version_detail(v: dict[str, Any]) -> None:
    meta = v["metadata"]
    p = console.print
    p(f"[bold]{v['name']} v{v['version']}[/]  sha256:{v['digest']}")
    ev = v.get("alias_event")
    if ev:
        when = f" as of {v['as_of']}" if v.get("as_of") else ""
        p(f"  alias {ev['alias']}{when}: set to v{ev['version']} at {_when(ev['at'])} by {ev['by']} "
          f"({ev['action']}{', forced' if ev['forced'] else ''}, history entry {ev['seq']})"
          + (f": {ev['why']}" if ev["why"] else ""))
    p(f"  aliases now: {', '.join(v['aliases']) or '-'}")
    p(f"  registered {_when(v['created_at'])} by {v['created_by']}" + (f": {v['why']}" if v["why"] else ""))
    p(f"  dataset manifest sha256: {meta.get('dataset_manifest_sha256') or 'unknown'}")
    training = meta.get("training") or {}
    if training:
        p("  training: " + ", ".join(f"{k}={training[k]}" for k in ("preset", "step", "tokens")
                                     if k in training))
    for part, files in v.get("files", {}).items():
        if files:
            size = sum(f["size"] for f in files)
            p(f"  {part}: {len(files)} files, {size:,} bytes, digest "
              f"{_short(meta.get('digests', {}).get(part), 16)}")
    metrics = meta.get("metrics") or {}
    if metrics:
        p("  metrics: " + ", ".join(f"{k}={_num(x) if not isinstance(x, str) else x}"
                                    for k, x in sorted(metrics.items())))


def gate_report(report: Any) -> None:
    held = f" (holder v{report.holder_version})" if report.holder_version else " (no holder yet)"
    console.print(f"gates for {report.alias} <- v{report.version}{held}, policy {report.policy}:")
    for r in report.results:
        mark = {"pass": "[green]pass[/]", "fail": "[red]FAIL[/]", "skip": "[yellow]skip[/]"}[r.status]
        console.print(f"  {mark} {r.line()}")
    console.print("[green]all gates pass[/]" if report.passed else
                  f"[red]{len(report.failed)} gate(s) fail[/]")


def move_result(res: Any) -> None:
    e = res.event
    if not res.changed:
        console.print(f"{e.name}@{e.alias} already points at v{e.version} (history entry {e.seq}); "
                      "nothing changed")
        return
    prev = f"v{e.previous_version}" if e.previous_version else "nothing"
    extra = " [red](gates overridden: --force)[/]" if e.forced else ""
    console.print(f"{e.name}@{e.alias}: {prev} -> v{e.version} ({e.action}, history entry "
                  f"{e.seq}){extra}")
    if res.report is not None:
        skipped = [r for r in res.report.results if r.status == "skip"]
        console.print(f"  gates: {sum(r.status == 'pass' for r in res.report.results)} passed, "
                      f"{len(res.report.failed)} failed, {len(skipped)} skipped (input missing)")
        for r in res.report.failed:
            console.print(f"  [red]overridden[/] {r.line()}")


def history_table(name: str, events: list[dict[str, Any]], versions: list[dict[str, Any]]) -> None:
    rows: list[tuple[str, list[str]]] = []
    for v in versions:
        rows.append((v["created_at"], [_when(v["created_at"]), "-", "-", "register", f"v{v['version']}",
                                       "-", v["created_by"], v["why"] or "-"]))
    for e in events:
        action = e["action"] + (" (forced)" if e["forced"] else "")
        prev = f"v{e['previous_version']}" if e["previous_version"] else "-"
        rows.append((e["at"], [_when(e["at"]), e["alias"], str(e["seq"]), action, f"v{e['version']}",
                               prev, e["by"], e["why"] or "-"]))
    if not rows:
        console.print(f"{name}: no history")
        return
    t = Table("time (UTC)", "alias", "entry", "action", "version", "previous", "by", "why",
              title=f"history of {name}")
    for _key, cells in sorted(rows, key=lambda r: r[0]):
        t.add_row(*cells)
    console.print(t)


class AddProgress:
    """A byte progress bar on a terminal; a line per file of 1 MiB or more elsewhere (logs);
    nothing when disabled."""

    def __init__(self, err: Console, enabled: bool, verb: str = "store") -> None:
        self.err, self.enabled, self.verb = err, enabled, verb
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> AddProgress:
        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

            self._bar = Progress(TextColumn(f"{self.verb} {{task.description}}"), BarColumn(),
                                 DownloadColumn(), console=self.err, transient=True)
            self._bar.start()
            self._task = self._bar.add_task("", total=None)
        return self

    def advance(self, what: str, size: int) -> None:
        if not self.enabled:
            return
        if self._bar is None:  # not a terminal: a line for each big file only
            if size >= 1 << 20:
                self.err.print(f"{self.verb} {what} ({size / 2**20:,.1f} MiB)", markup=False)
            return
        self._bar.update(self._task, description=what[-40:])
        self._bar.advance(self._task, size)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
