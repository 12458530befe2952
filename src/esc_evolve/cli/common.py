"""Helpers shared by every command module: consoles, the user-error wrapper, the --set option."""

from __future__ import annotations

import functools
from collections.abc import Callable

import typer
from rich.console import Console
from rich.markup import escape

from esc_evolve.errors import EscEvolveError

console = Console()
err_console = Console(stderr=True)

SetOption = typer.Option(
    None, "--set", "-s", help="Override a config value, e.g. --set sft.learning_rate=1e-4 (repeatable)."
)


def user_errors(command: Callable[..., None]) -> Callable[..., None]:
    """User errors (bad config, bad data, unknown backbone) become one message and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> None:
        try:
            command(*args, **kwargs)
        except EscEvolveError as exc:
            err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper
