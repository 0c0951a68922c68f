"""The `trustmoe` command: one Typer app; each sub-command is a thin call into a module.

Sub-command groups live beside this file (one module per stage, each with `register(app)`),
so every stage owns its own command-line surface. Errors meant for users are `TrustmoeError`:
they print one line and exit with status 2, never a traceback. A missing third-party module
is one line too: the `pip install 'trustmoe[x]'` to run for an optional extra, or a
reinstall for a base dependency (a broken install).
"""

from __future__ import annotations

import importlib

import typer
from rich.console import Console
from rich.markup import escape

from trustmoe.config import ConfigError
from trustmoe.io import EXTRAS, TrustmoeError

app = typer.Typer(
    name="trustmoe",
    help="Raw text to a served, monitored Mixture-of-Experts model; every artifact traceable by hash.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)

COMMAND_MODULES = ("train", "data", "eval", "serve", "security", "registry", "monitor")
for _name in COMMAND_MODULES:
    importlib.import_module(f"trustmoe.cli.{_name}").register(app)


def fail(message: str, code: int = 2) -> None:
    # escaped: messages hold brackets ("pip install 'trustmoe[export]'", "list[int]") that
    # rich would otherwise read as markup and drop
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise SystemExit(code)


def missing_module_message(e: ModuleNotFoundError) -> str | None:
    """One line for an absent third-party module (None for our own modules: that is a bug)."""
    name = e.name or ""
    top = name.split(".", 1)[0]
    if not top or top == "trustmoe":
        return None
    if top in EXTRAS:
        return (f"this needs the optional package {top!r}, which is not installed: "
                f"pip install 'trustmoe[{EXTRAS[top]}]'")
    return (f"the Python module {name!r} is missing, so this trustmoe install is incomplete: "
            "reinstall it (pip install --force-reinstall trustmoe, or `make` in a checkout)")


def main() -> None:
    try:
        app()
    except (TrustmoeError, ConfigError) as e:
        fail(str(e))
    except ModuleNotFoundError as e:
        msg = missing_module_message(e)
        if msg is None:
            raise
        fail(msg)
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
