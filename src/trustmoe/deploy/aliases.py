"""Moving aliases: promote (with gates) and rollback.

Concurrency: a move reads the alias's newest history entry (seq N) and the gate inputs in one
transaction, then appends entry N + 1 in a second one. (model, alias, seq) is unique in the
database, so of two writers that both read N exactly one appends N + 1; the other gets a
`ConflictError` and writes nothing — its gates were checked against a holder that is gone.

Rollback walks the history as a stack: a promotion pushes its version, a rollback pops one,
so successive rollbacks step back through earlier holders (v3 -> v2 -> v1), never ping-pong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from trustmoe.deploy import db
from trustmoe.deploy.db import ConflictError, RegistryError
from trustmoe.deploy.gates import GateInput, GateReport, Policy, evaluate, load_policy
from trustmoe.deploy.records import PromoteResult, check_alias
from trustmoe.deploy.schema import AliasEventRow, ModelRow, VersionRow

if TYPE_CHECKING:
    from trustmoe.deploy.registry import Registry


class GateRefusal(RegistryError):
    """The gates refused a promotion; `.report` holds every result."""

    def __init__(self, message: str, report: GateReport) -> None:
        super().__init__(message)
        self.report = report


def refusal_message(report: GateReport, name: str) -> str:
    failed = report.failed
    lines = [f"promotion of {name}@{report.version} to {report.alias} refused: "
             f"{len(failed)} gate{'s' if len(failed) != 1 else ''} failed ({report.policy})"]
    lines += [f"  {r.line()}" for r in failed]
    lines.append("  override with --force --why TEXT (recorded in the alias history)")
    return "\n".join(lines)


def _state(s: Session, m: ModelRow, alias: str) -> tuple[int, list[int], AliasEventRow | None]:
    """(newest seq, holder stack, newest row) of an alias."""
    rows = s.execute(select(AliasEventRow).where(AliasEventRow.model_id == m.id,
                                                 AliasEventRow.alias == alias)
                     .order_by(AliasEventRow.seq)).scalars().all()
    stack: list[int] = []
    for r in rows:
        if r.action == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(r.version)
    return (rows[-1].seq if rows else 0), stack, (rows[-1] if rows else None)


def _gate_input(reg: Registry, name: str, row: VersionRow) -> GateInput:
    meta = row.meta if isinstance(row.meta, dict) else {}
    cache: dict[str, Any] = {}

    def doc(part: str) -> Any:
        if part not in cache:
            cache[part] = reg.read_json(name, row.version, part, f"{part}.json")
        return cache[part]

    return GateInput(row.version, dict(meta.get("metrics") or {}),
                     dict(meta.get("metrics_missing") or {}), doc)


def find_policy_file(url: str) -> Path | None:
    """The gates file in force: $TRUSTMOE_GATES, else gates.toml beside a SQLite registry,
    else None (the built-in default policy)."""
    env = os.environ.get("TRUSTMOE_GATES")
    if env:
        return Path(env)
    path = db.sqlite_path(url)
    if path is not None and (path.parent / "gates.toml").is_file():
        return path.parent / "gates.toml"
    return None


def _policy(reg: Registry, policy: Any) -> Policy:
    if isinstance(policy, Policy):
        return policy
    return load_policy(Path(policy) if policy is not None else find_policy_file(reg.url))


def _prepare(reg: Registry, name: str, version: int, alias: str, pol: Policy
             ) -> tuple[int, AliasEventRow | None, GateReport | None]:
    """(newest seq, newest history row, gate report; None if the alias already holds it)."""
    with db.translate_errors(reg.url), reg._read() as s:
        m = reg._model(s, name)
        cand = reg._version_row(s, m, version)
        seq, _stack, last = _state(s, m, alias)
        if last is not None and last.version == version:
            return seq, last, None
        holder = reg._version_row(s, m, last.version) if last is not None else None
        report = evaluate(pol, alias, _gate_input(reg, name, cand),
                          _gate_input(reg, name, holder) if holder is not None else None)
    return seq, last, report


def check_gates(reg: Registry, name: str, version: int, alias: str, policy: Any = None
                ) -> GateReport:
    """The gate report a promotion would get now (writes nothing)."""
    check_alias(alias)
    pol = _policy(reg, policy)
    with db.translate_errors(reg.url), reg._read() as s:
        m = reg._model(s, name)
        cand = reg._version_row(s, m, version)
        _seq, _stack, last = _state(s, m, alias)
        holder = reg._version_row(s, m, last.version) if last is not None else None
        return evaluate(pol, alias, _gate_input(reg, name, cand),
                        _gate_input(reg, name, holder) if holder is not None else None)


def promote(reg: Registry, name: str, version: int, alias: str, *, why: str, force: bool,
            policy: Any, expected_seq: int | None, by: str) -> PromoteResult:
    check_alias(alias)
    if force and not why.strip():
        raise RegistryError("--force needs --why: say why the gates are overridden (it is "
                            "recorded in the alias history)")
    pol = _policy(reg, policy)  # a malformed gates file fails before anything is read or written
    seq, last, report = _prepare(reg, name, version, alias, pol)
    if report is None:
        from trustmoe.deploy.registry import _event

        assert last is not None
        return PromoteResult(_event(name, last), changed=False)
    if not report.passed and not force:
        raise GateRefusal(refusal_message(report, name), report)
    overridden = force and not report.passed
    gates = {"report": report.to_dict(), "overridden": overridden}
    return _append(reg, name, alias, version, last.version if last else None, "promote",
                   overridden, why, by, gates, seq if expected_seq is None else expected_seq,
                   report)


def rollback(reg: Registry, name: str, alias: str, *, why: str, expected_seq: int | None,
             by: str) -> PromoteResult:
    check_alias(alias)
    with db.translate_errors(reg.url), reg._read() as s:
        m = reg._model(s, name)
        seq, stack, last = _state(s, m, alias)
        if last is None:
            raise RegistryError(f"alias {name}@{alias} has no history: nothing to roll back")
        if len(stack) < 2:
            raise RegistryError(f"alias {name}@{alias} has no earlier holder to roll back to "
                                f"(it holds v{last.version}, its first)")
        target = stack[-2]
    gates = {"report": None, "rolled_back_from": last.version}
    return _append(reg, name, alias, target, last.version, "rollback", False, why, by, gates,
                   seq if expected_seq is None else expected_seq, None)


def _append(reg: Registry, name: str, alias: str, version: int, previous: int | None,
            action: str, forced: bool, why: str, by: str, gates: dict[str, Any],
            expected_seq: int, report: GateReport | None) -> PromoteResult:
    from trustmoe.deploy.registry import _event, fault_point, now

    try:
        with db.translate_errors(reg.url), reg._write() as s, s.begin():
            m = reg._model(s, name)
            newest = s.execute(select(AliasEventRow.seq).where(
                AliasEventRow.model_id == m.id, AliasEventRow.alias == alias)
                .order_by(AliasEventRow.seq.desc()).limit(1)).scalar()
            if (newest or 0) != expected_seq:
                raise _conflict(name, alias, expected_seq, newest or 0)
            row = AliasEventRow(model_id=m.id, alias=alias, seq=expected_seq + 1, version=version,
                                previous_version=previous, action=action, forced=forced,
                                at=now(), by=by, why=why, gates=gates)
            s.add(row)
            s.flush()
            fault_point("alias:before-commit")
            event = _event(name, row)
    except sa_exc.IntegrityError:
        raise _conflict(name, alias, expected_seq, None) from None
    return PromoteResult(event, changed=True, report=report)


def _conflict(name: str, alias: str, expected: int, newest: int | None) -> ConflictError:
    now_at = f" (its history is now at entry {newest})" if newest is not None else ""
    return ConflictError(f"conflict: alias {name}@{alias} was moved by another writer after "
                         f"entry {expected} was read{now_at}; nothing was written - check "
                         "`trustmoe registry history` and try again")
