"""A rich progress bar for training: step, loss, tokens/s, learning rate, load balance, ETA."""

from __future__ import annotations

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


class TrainProgress:
    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
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
            disable=not enabled,
        )
        self.task = self.progress.add_task(
            "train", total=total, completed=start, loss="-", val="-", tps="-", lr="-", bal="-"
        )
        self.last_val = "-"

    def __enter__(self) -> TrainProgress:
        self.progress.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.progress.stop()

    def set_total(self, total: int) -> None:
        self.progress.update(self.task, total=total)

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if "val_loss" in rec:
            self.last_val = f"{rec['val_loss']:.3f}"
            if not self.console.is_terminal and self.enabled:
                self.console.print(
                    f"step {step}: loss {rec['loss']:.4f} val {rec['val_loss']:.4f} "
                    f"{rec['tokens_per_s']:.0f} tok/s"
                )
        bal = rec.get("load_balance")
        self.progress.update(
            self.task, completed=step, loss=f"{rec['loss']:.3f}", val=self.last_val,
            tps=f"{rec['tokens_per_s']:.0f}", lr=f"{rec['lr']:.2e}",
            bal="-" if bal is None else f"{bal:.2f}",
        )
