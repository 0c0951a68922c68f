"""Training progress: a rich bar on a terminal, plain lines everywhere else.

On a terminal the bar shows step, loss, validation loss, tokens/s, learning rate, load
balance and ETA. When the output is not a terminal (a log file, CI, `| tee`), a live bar
draws nothing until the end, so a plain line is printed instead: after the first step, then
every `interval_s` seconds, at every validation, and at the last step:

    train step 120/480 (25%) loss 5.1234 val 5.2345 | 1,234 tok/s | lr 1.00e-03 | balance 0.98 | 1m02s, ETA 3m05s
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LINE_INTERVAL_S = 15.0  # seconds between plain progress lines when not on a terminal


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class TrainProgress:
    """Call `update(step, record)` after each optimizer step (the record of `train/loop.py`)."""

    def __init__(self, total: int, start: int, enabled: bool = True,
                 console: Console | None = None, interval_s: float = LINE_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, provisional: bool = False) -> None:
        self.enabled = enabled
        self.provisional = provisional  # total is a guess until the time budget fits it
        self.console = console or Console(stderr=True)
        self.plain = enabled and not self.console.is_terminal
        self.total, self.start = total, start
        self.interval_s, self.clock = interval_s, clock
        self.t0 = clock()
        self.last_line: float | None = None
        self.lines = 0  # plain lines printed
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("val {task.fields[val]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("balance {task.fields[bal]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled or self.plain,
        )
        self.task = self.progress.add_task(
            "train", total=total, completed=start, loss="-", val="-", tps="-", lr="-", bal="-"
        )
        self.last_val: float | None = None

    def __enter__(self) -> TrainProgress:
        self.t0 = self.clock()
        self.progress.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.progress.stop()

    def set_total(self, total: int) -> None:
        self.total, self.provisional = total, False
        self.progress.update(self.task, total=total)

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if rec.get("val_loss") is not None:
            self.last_val = float(rec["val_loss"])
        bal = rec.get("load_balance")
        if self.plain:
            now = self.clock()
            due = self.last_line is None or now - self.last_line >= self.interval_s
            if due or "val_loss" in rec or step >= self.total:
                self.console.print(self.line(step, rec, now), markup=False, highlight=False,
                                   soft_wrap=True)
                self.last_line = now
                self.lines += 1
            return
        self.progress.update(
            self.task, completed=step, loss=f"{rec['loss']:.3f}",
            val="-" if self.last_val is None else f"{self.last_val:.3f}",
            tps=f"{rec['tokens_per_s']:.0f}", lr=f"{rec['lr']:.2e}",
            bal="-" if bal is None else f"{bal:.2f}",
        )

    def line(self, step: int, rec: dict[str, Any], now: float) -> str:
        """One plain progress line (no markup)."""
        total = max(self.total, step, 1)
        elapsed = now - self.t0
        done = step - self.start
        eta = elapsed / done * (total - step) if done > 0 else None
        bal = rec.get("load_balance")
        where = (f"{step} (fitting the schedule to the time budget)" if self.provisional
                 else f"{step}/{total} ({100 * step / total:.0f}%)")
        if self.provisional:
            eta = None
        parts = [
            f"train step {where} loss {rec['loss']:.4f}"
            + (f" val {self.last_val:.4f}" if self.last_val is not None else ""),
            f"{rec['tokens_per_s']:,.0f} tok/s",
            f"lr {rec['lr']:.2e}",
        ]
        if bal is not None:
            parts.append(f"balance {bal:.2f}")
        parts.append(_duration(elapsed) + (f", ETA {_duration(eta)}" if eta is not None else ""))
        return " | ".join(parts)
