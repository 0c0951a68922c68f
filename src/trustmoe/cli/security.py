"""`trustmoe security ...`: the guard, artifact integrity and model audits.

The group is defined here; each part adds its commands from its own module
(`security_guard.py`, `security_scan.py`), so the two never edit the same file.
"""

from __future__ import annotations

import importlib

import typer

security_app = typer.Typer(
    help="Guard training, artifact integrity and model audits (privacy, backdoors).",
    no_args_is_help=True,
)

# each part module has add_commands(security_app, app), e.g. "security_guard", "security_scan"
PART_MODULES: tuple[str, ...] = ("security_guard", "security_scan")


def register(app: typer.Typer) -> None:
    """Add the `security` group (and any top-level commands its parts own) to the main app."""
    for name in PART_MODULES:
        importlib.import_module(f"trustmoe.cli.{name}").add_commands(security_app, app)
    app.add_typer(security_app, name="security")
