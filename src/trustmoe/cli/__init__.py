"""The `trustmoe` command: one Typer app; each sub-command is a thin call into a module.

Sub-command groups live beside this file (one module per stage, each with `register(app)`),
so every stage owns its own command-line surface. Errors meant for users are `TrustmoeError`:
they print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import importlib

import typer
from rich.console import Console

from trustmoe.config import ConfigError
from trustmoe.io import TrustmoeError

app = typer.Typer(
    name="trustmoe",
    help="Raw text to a served, monitored Mixture-of-Experts model; every artifact traceable by hash.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)

COMMAND_MODULES = ("train", "data", "eval", "serve", "security", "monitor")
for _name in COMMAND_MODULES:
    importlib.import_module(f"trustmoe.cli.{_name}").register(app)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise SystemExit(code)


def main() -> None:
    try:
        app()
    except (TrustmoeError, ConfigError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except MemoryError:
        fail("out of memory: try a smaller --batch-size or preset")
    except OSError as e:
        if e.filename is not None:
            fail(f"{e.strerror}: {e.filename}")
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
