"""`esc-evolve chat MODEL`: talk to a model in the terminal, behind the safety guard, with profile memory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from esc_evolve.cli.common import SetOption, console, user_errors
from esc_evolve.errors import EscEvolveError

if TYPE_CHECKING:
    from esc_evolve.serving import ChatSession

NOTICE = (
    "[bold]esc-evolve chat[/bold]: a research model, [bold]not a clinical tool[/bold] and no substitute for a "
    "person or professional help; in an emergency call your local emergency number. /help lists the commands."
)
COMMANDS = {
    "/reset": "start the conversation over (what was inferred about you is kept)",
    "/profile": "what the model has inferred about you so far",
    "/forget": "delete everything stored about you (conversation and profiles)",
    "/quit": "leave (also /exit or Ctrl-D)",
    "/help": "this list",
}


def register(app: typer.Typer) -> None:
    """Add the `chat` command to `app`."""
    app.command("chat")(chat)


@user_errors
def chat(
    model: str = typer.Argument(
        ...,
        help="A backbone (alias, folder, hub id), a run's m0/ or iterN/mN/ folder, or a run directory (its newest "
        "model); with --backend openai, the served model's name.",
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML config; default: the run's own config for a model of a run."
    ),
    overrides: list[str] | None = SetOption,
    seeker: str = typer.Option("local", "--seeker", help="Whose memory to use (conversation and profile)."),
    backend: str | None = typer.Option(
        None, "--backend", help="Generation backend (transformers, vllm, openai); default: the config's."
    ),
    base_url: str | None = typer.Option(
        None, "--base-url", help="With --backend openai: the engine's URL, e.g. http://127.0.0.1:8000/v1."
    ),
    tokenizer: str | None = typer.Option(
        None,
        "--tokenizer",
        help="With --backend openai: the served model's tokenizer (a backbone or a run's model folder), for "
        "profile memory.",
    ),
) -> None:
    """Talk to MODEL: streamed replies, the safety guard in front, memory per seeker (docs/serving.md)."""
    console.print(NOTICE, highlight=False)
    from esc_evolve.cli.model_arg import resolve_model, served_tokenizer
    from esc_evolve.evolve.principles import load_principles
    from esc_evolve.generation import build_generator
    from esc_evolve.safety import SafetyGuard
    from esc_evolve.serving import ChatSession, SeekerStore

    cfg, model_config, adapter, label = resolve_model(model, config, overrides, backend=backend, base_url=base_url)
    # Safety events show in the chat itself; without a configured handler they would also land on stderr.
    logging.getLogger("esc_evolve.serving").addHandler(logging.NullHandler())
    with console.status(f"loading {escape(label)} and the safety guard"):
        generator = build_generator(model_config, cfg.generation, adapter, seed=cfg.run.seed)
        if tokenizer is not None and generator.tokenizer is None:
            generator.tokenizer = served_tokenizer(model_config, tokenizer)
        guard = SafetyGuard(cfg.safety)
    store = SeekerStore(cfg.serve.db_path, enabled=cfg.serve.store)
    with generator:
        session = ChatSession(
            generator,
            guard,
            store,
            seeker,
            system_prompt=cfg.data.system_prompt,
            use_profile=cfg.serve.use_profile,
            profile_every=cfg.serve.profile_every,
            principles=load_principles(cfg.evolve.principles_path),
        )
        _print_start(session, label)
        _loop(session)


# ----------------------------------------------------------------------------------------------------------
# The conversation


def _print_start(session: ChatSession, label: str) -> None:
    store = session.store
    memory = (
        f"memory of seeker [bold]{escape(session.seeker)}[/bold] in {escape(str(store.path))} (/forget deletes it)"
        if store.enabled
        else "memory: off (serve.store is false), nothing is written"
    )
    profile = "replies use the inferred profile" if session.use_profile else "profile not used for replies"
    console.print(f"[dim]model: {escape(label)}; {memory}; {profile}[/dim]", highlight=False)
    if session.messages:
        console.print(
            f"[dim]continuing your conversation ({len(session.messages)} earlier messages; /reset starts over)[/dim]"
        )


def _loop(session: ChatSession) -> None:
    profile_failed = False
    while True:
        try:
            line = console.input("[bold cyan]you[/bold cyan] > ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        message = line.strip()
        if not message:
            continue
        if message.startswith("/"):
            if _command(session, message.split()[0].lower()):
                return
            continue
        try:
            _reply(session, message)
        except KeyboardInterrupt:
            console.print("\n[dim](stopped)[/dim]")
            continue
        except EscEvolveError as exc:  # e.g. a remote engine that is down: say so, keep the chat open
            console.print(f"\n[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
            continue
        if session.profile_due() and not profile_failed:
            profile_failed = not _update_profile(session)


def _reply(session: ChatSession, message: str) -> None:
    pieces = session.reply(message)
    if session.last["safe_reply"]:
        _resources_panel("".join(pieces).strip(), urgent=True)
        return
    console.print("[bold green]supporter[/bold green] > ", end="")
    for piece in pieces:
        if session.last["replaced"] or session.last["resources_added"]:  # the one piece the guard added
            console.print()
            _resources_panel(piece.strip(), urgent=session.last["replaced"])
            return
        console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
        console.file.flush()
    console.print()


def _resources_panel(text: str, urgent: bool) -> None:
    title = "You don't have to go through this alone" if urgent else "Support is there if you need it"
    console.print(Panel(Text(text), title=title, title_align="left", border_style="red" if urgent else "yellow"))


def _update_profile(session: ChatSession) -> bool:
    """Infer the profile now; False (with a note) when the backend cannot (a remote engine without tokenizer)."""
    from esc_evolve.generation import GenerationError

    try:
        with console.status("reflecting on the conversation"):
            session.maybe_update_profile()
    except GenerationError as exc:
        console.print(f"[dim]profile memory is off for this chat: {escape(str(exc))}[/dim]", highlight=False)
        return False
    return True


def _command(session: ChatSession, command: str) -> bool:
    """Run a /command; True to leave."""
    if command in ("/quit", "/exit"):
        return True
    if command == "/reset":
        session.reset()
        console.print("[dim]conversation cleared; what was inferred about you is kept (/forget deletes it)[/dim]")
    elif command == "/forget":
        removed = session.forget()
        where = "from " + str(session.store.path) if session.store.enabled else "(nothing was stored)"
        what = "deleted everything stored about you" if removed else "nothing stored about you"
        console.print(f"[dim]{what} {escape(where)}; this conversation starts fresh[/dim]", highlight=False)
    elif command == "/profile":
        _print_profile(session)
    else:
        table = Table("command", "what it does", show_header=False, box=None)
        for name, what in COMMANDS.items():
            table.add_row(name, what)
        if command != "/help":
            console.print(f"unknown command {escape(command)}", highlight=False)
        console.print(table)
    return False


def _print_profile(session: ChatSession) -> None:
    profile = session.profile
    if not profile:
        console.print(
            f"[dim]nothing inferred about you yet: a profile is inferred every {session.profile_every} of your "
            "messages (serve.profile_every)[/dim]"
        )
        return
    table = Table("what", "inferred", title=f"inferred at turn {profile.get('turn')}", title_justify="left")
    for key, value in profile.items():
        if key not in ("turn", "time"):
            table.add_row(escape(key), escape(str(value)))
    console.print(table)
    if not session.use_profile:
        console.print("[dim](not used for replies: serve.use_profile is false)[/dim]")
