"""`esc-evolve generate`: a model's replies to a few dialogue contexts, next to the human supporter's."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.panel import Panel

from esc_evolve.cli.common import SetOption, console, user_errors

if TYPE_CHECKING:
    from esc_evolve.data import TurnSample


def register(app: typer.Typer) -> None:
    """Add the `generate` command to `app`."""
    app.command("generate")(generate)


@user_errors
def generate(
    data: str = typer.Option(..., "--data", "-d", help="Data file, builtin:train|valid|all, or hf:REPO[:SPLIT]."),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="A backbone (alias, folder, hub id) or a LoRA adapter folder; an adapter is applied to the "
        "config's model.name. Default: the config's model.name.",
    ),
    n: int = typer.Option(5, "--n", min=1, help="How many contexts to show."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (model, data, generation)."),
    overrides: list[str] | None = SetOption,
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip malformed records."),
) -> None:
    """Generate replies for the first N contexts of DATA, shown with the human reference reply."""
    from esc_evolve.cli.model_arg import model_and_adapter
    from esc_evolve.config import load_config
    from esc_evolve.data import load_split
    from esc_evolve.data.prompts import build_messages
    from esc_evolve.generation import GenerationRequest, build_generator

    cfg = load_config(config, [*(overrides or []), *(["data.skip_invalid=true"] if skip_invalid else [])])
    model_config, adapter = model_and_adapter(cfg.model, model)
    samples = _spread(load_split(data, cfg.data).samples, n)
    requests = [
        GenerationRequest(messages=build_messages(s.context, cfg.data.system_prompt), id=s.sample_id) for s in samples
    ]
    with build_generator(model_config, cfg.generation, adapter, seed=cfg.run.seed) as generator:
        results = generator.generate(requests)
    for sample, result in zip(samples, results, strict=True):
        history = "\n".join(f"[bold]{t.speaker}[/bold]: {escape(t.text)}" for t in sample.context[-4:])
        console.print(Panel(history, title=f"{sample.sample_id} (last turns of the context)", title_align="left"))
        reply = f"{escape(result.text)}\n[dim]({result.num_tokens} tokens, {result.finish_reason})[/dim]"
        console.print(Panel(reply, subtitle="model reply", border_style="green"))
        console.print(Panel(escape(sample.response), subtitle="human reference", border_style="blue"))


def _spread(samples: list[TurnSample], n: int) -> list[TurnSample]:
    """n samples, one per conversation where there are enough (its middle turn: some history to respond to)."""
    by_conversation: dict[str, list[TurnSample]] = {}
    for sample in samples:
        by_conversation.setdefault(sample.conversation_id, []).append(sample)
    middles = [group[len(group) // 2] for group in by_conversation.values()]
    return (middles if len(middles) >= n else samples)[:n]
