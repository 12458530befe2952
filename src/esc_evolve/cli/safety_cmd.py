"""`esc-evolve safety check`: the risk detector on one message or on a JSON Lines file of messages."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from esc_evolve.cli.common import console, err_console, user_errors
from esc_evolve.errors import DataFormatError, EscEvolveError

safety_app = typer.Typer(help="The safety layer: risk in seeker messages (a floor, not a clinical tool).")


def register(app: typer.Typer) -> None:
    """Add the `safety` command group to `app`."""
    app.add_typer(safety_app, name="safety")


@safety_app.command("check")
@user_errors
def check(
    text: str | None = typer.Argument(None, help="A seeker message (quote it); or use --file."),
    file: Path | None = typer.Option(
        None, "--file", "-f", help='JSON Lines, one {"text": ..., "history": [earlier messages]?} per line.'
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per input message, in input order."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip unreadable lines and count them."),
) -> None:
    """Assess risk: level (none | concern | urgent), score, categories and reason for each message."""
    if (text is None) == (file is None):
        raise EscEvolveError("give either a TEXT argument or --file (not both)")
    messages = [("argument", {"text": text})] if text is not None else read_messages(file, skip_invalid)
    from esc_evolve.safety import default_detector

    detector = default_detector()
    assessed = detector.assess_many([m["text"] for _, m in messages], [m.get("history") for _, m in messages])
    if as_json:
        for (where, _), assessment in zip(messages, assessed, strict=True):
            sys.stdout.write(json.dumps({"line": where, **assessment.to_dict()}, ensure_ascii=False) + "\n")
        return
    _print_table(messages, assessed)


def read_messages(path: Path, skip_invalid: bool) -> list[tuple[str, dict[str, Any]]]:
    """`(file:line, record)` for each message of a JSON Lines file; a bad line is an error naming file and line
    (exit 2), or skipped and counted on stderr with `skip_invalid`."""
    from esc_evolve.data.loaders import NotUTF8, jsonl_lines

    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    good, skipped = [], []
    for where, line in jsonl_lines(path):
        problem = line.message if isinstance(line, NotUTF8) else _problem(line)
        if problem is None:
            good.append((where, json.loads(line)))
        elif skip_invalid:
            skipped.append(f"{where}: {problem}")
        else:
            raise DataFormatError(f"{where}: {problem}")
    if skipped:
        err_console.print(f"skipped {len(skipped)} invalid line(s), first: {escape(skipped[0])}", highlight=False)
    return good


def _problem(line: str) -> str | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"malformed JSON: {exc.msg}"
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        return 'expected an object with a "text" string'
    history = record.get("history")
    if history is not None and not (isinstance(history, list) and all(isinstance(h, str) for h in history)):
        return '"history" must be a list of strings'
    return None


def _print_table(messages: list[tuple[str, dict[str, Any]]], assessed: list[Any]) -> None:
    table = Table("line", "level", "score", "categories", "text")
    colour = {"none": "green", "concern": "yellow", "urgent": "bold red"}
    for (where, message), a in zip(messages, assessed, strict=True):
        shown = message["text"] if len(message["text"]) <= 70 else message["text"][:67] + "..."
        level = f"[{colour[a.level]}]{a.level}[/]"
        table.add_row(escape(where), level, f"{a.score:.2f}", ", ".join(a.categories), escape(shown))
    console.print(table)
    counts = Counter(a.level for a in assessed)
    console.print(
        f"{len(assessed)} message(s): {counts['urgent']} urgent, {counts['concern']} concern, {counts['none']} none"
        " (a floor, not a clinical tool: see docs/safety.md)"
    )
