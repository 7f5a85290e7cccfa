"""Helpers shared by the stage commands: params loading, user-error handling, help text."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from adcm.checkpoint import CheckpointError
from adcm.config import Params, ParamsError, describe, load_params
from adcm.data import DatasetError
from adcm.download import DownloadError
from adcm.io import atomic_write_text

F = TypeVar("F", bound=Callable[..., Any])

PARAMS_OPTION = typer.Option(
    Path("params.yaml"), "--params", help="Params file; the whole file is validated before any work starts."
)
SET_OPTION = typer.Option(
    [], "--set", "-S", help="Override a params key for this run only, KEY=VALUE (YAML value), repeatable, e.g. "
    "-S lambda=0.1 -S train.duration_kimg=6.4; validated like the file.")

#: Errors that are the user's to fix: printed as one line, exit status 1 (params errors: 2).
USER_ERRORS: tuple[type[BaseException], ...] = (DatasetError, CheckpointError, DownloadError, FileNotFoundError)


def register_user_error(*types_: type[BaseException]) -> None:
    """Add exception types that :func:`user_errors` reports as one line."""
    global USER_ERRORS
    USER_ERRORS = (*USER_ERRORS, *types_)


def read_params(path: Path, overrides: list[str] | None = None) -> Params:
    """Load and validate the params file (plus ``--set`` overrides); a problem exits with status 2 and one line."""
    try:
        return load_params(path, overrides or ())
    except ParamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def user_errors(func: F) -> F:
    """Report the library's user-facing errors as ``error: …`` on one line and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ParamsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except USER_ERRORS as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def params_epilog(*groups: str) -> str:
    """The ``--help`` epilog listing every params key the command reads, with type and meaning."""
    rows = [r for r in describe(Params, "") if any(r[0] == g or r[0].startswith(g + ".") for g in groups)]
    lines = [f"Keys read from the params file ({', '.join(groups)}):", ""]
    for key, kind, doc in rows:
        lines.append(f"• {key}: {doc} [{kind}]")
        lines.append("")
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as pretty JSON atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
