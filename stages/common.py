"""What every stage command shares: the params options, loading them, and one-line errors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from adcm.config import OnConfigChange, Params, describe, load_params
from adcm.errors import AdcmError

F = TypeVar("F", bound=Callable[..., Any])

PARAMS_OPTION = typer.Option(
    Path("params.yaml"), "--params", help="Params file; the whole file is validated before any work starts."
)
SET_OPTION = typer.Option(
    [],
    "--set",
    "-S",
    help="Override a params key for this run only, KEY=VALUE (YAML value), repeatable, e.g. "
    "-S lambda=0.1 -S train.duration_kimg=6.4; validated like the file.",
)
FRESH_OPTION = typer.Option(False, "--fresh", help="Ignore any existing checkpoint and start over.")
ON_CONFIG_CHANGE_OPTION = typer.Option(
    OnConfigChange.refuse,
    help="A checkpoint written under other params: refuse (exit 2 with a message) "
    "or restart from scratch (what `dvc exp run -S …` needs).",
)
PROGRESS_OPTION = typer.Option(True, help="Show progress bars.")


def read_params(path: Path, overrides: list[str] | None = None) -> Params:
    """Load and validate the params file plus ``--set`` overrides (a problem raises ParamsError: one line, exit 2)."""
    return load_params(path, overrides or ())


def user_errors(func: F) -> F:
    """Report the library's errors (:class:`~adcm.errors.AdcmError`) as ``error: …`` on one line and exit with
    the error's code (2: input to fix; 1: the run failed)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AdcmError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def params_epilog(*groups: str) -> str:
    """The ``--help`` epilog listing every params key the command reads, with type and meaning."""
    rows = [r for r in describe(Params, "") if any(r[0] == g or r[0].startswith(g + ".") for g in groups)]
    lines = [f"Keys read from the params file ({', '.join(groups)}):", ""]
    for key, kind, doc in rows:
        lines.append(f"• {key}: {doc} [{kind}]")
        lines.append("")
    return "\n".join(lines)
