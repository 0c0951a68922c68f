"""Training progress: plain lines at intervals when not on a terminal, a live bar on one."""

from __future__ import annotations

import io

from rich.console import Console

from trustmoe.train.progress import TrainProgress


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def rec(loss: float = 5.0, val: float | None = None) -> dict[str, object]:
    r: dict[str, object] = {"loss": loss, "tokens_per_s": 1234.0, "lr": 1e-3,
                            "load_balance": 0.9}
    if val is not None:
        r["val_loss"] = val
    return r


def run(console: Console, clock: Clock, steps: int, step_s: float, **kw: object) -> TrainProgress:
    bar = TrainProgress(steps, 0, console=console, interval_s=15.0, clock=clock, **kw)  # type: ignore[arg-type]
    with bar:
        for s in range(1, steps + 1):
            clock.t += step_s
            bar.update(s, rec(val=4.5 if s == 50 else None))
    return bar


def test_plain_lines_at_intervals_when_not_a_terminal() -> None:
    buf = io.StringIO()
    bar = run(Console(file=buf, force_terminal=False, width=200), Clock(), steps=100, step_s=1.0)
    lines = buf.getvalue().splitlines()
    # first step, every 15 s (100 s of steps), the validation at step 50, and the last step
    assert 7 <= len(lines) <= 9 and bar.lines == len(lines)
    assert lines[0].startswith("train step 1/100 (1%) loss 5.0000 | 1,234 tok/s | lr 1.00e-03")
    assert any(x.startswith("train step 50/100 (50%) loss 5.0000 val 4.5000") for x in lines)
    assert lines[-1].startswith("train step 100/100 (100%)") and "ETA 0s" in lines[-1]
    assert "1m40s" in lines[-1]  # elapsed
    assert "\x1b" not in buf.getvalue()  # no escape codes in a log


def test_no_plain_lines_on_a_terminal() -> None:
    buf = io.StringIO()
    bar = run(Console(file=buf, force_terminal=True, width=200), Clock(), steps=20, step_s=1.0)
    assert bar.lines == 0 and "train step" not in buf.getvalue()


def test_disabled_prints_nothing() -> None:
    buf = io.StringIO()
    run(Console(file=buf, force_terminal=False), Clock(), steps=20, step_s=30.0, enabled=False)
    assert buf.getvalue() == ""


def test_provisional_total_shows_no_eta_until_fitted() -> None:
    buf = io.StringIO()
    clock = Clock()
    bar = TrainProgress(2000, 0, console=Console(file=buf, force_terminal=False, width=200),
                        clock=clock, provisional=True)
    with bar:
        clock.t += 2
        bar.update(1, rec())
        bar.set_total(40)  # the time budget fitted the schedule
        clock.t += 20
        bar.update(2, rec())
    first, second = buf.getvalue().splitlines()
    assert "fitting the schedule" in first and "ETA" not in first and "/2000" not in first
    assert second.startswith("train step 2/40 (5%)") and "ETA" in second
