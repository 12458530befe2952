"""`esc-evolve serve MODEL`: an OpenAI-compatible server with the safety layer and profile memory in front."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from esc_evolve.cli.common import SetOption, console, user_errors
from esc_evolve.errors import EscEvolveError


def register(app: typer.Typer) -> None:
    """Add the `serve` command to `app`."""
    app.command("serve")(serve)


@user_errors
def serve(
    model: str = typer.Argument(
        ...,
        help="A backbone (alias, folder, hub id), a LoRA adapter folder, a run's model (runs/NAME/m0, "
        "runs/NAME/iter2/m2) or a run directory (its newest model). With --backend openai: the model name the "
        "remote engine serves.",
    ),
    host: str | None = typer.Option(None, "--host", help="Address to bind (serve.host, default 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="Port (serve.port, default 8000)."),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML config. Default: the run's config.yaml when MODEL is in a run."
    ),
    overrides: list[str] | None = SetOption,
    backend: str | None = typer.Option(
        None, "--backend", help="Generation backend: transformers (default), vllm, or openai (a remote engine)."
    ),
    base_url: str | None = typer.Option(
        None, "--base-url", help="With --backend openai: the engine's URL, e.g. http://gpu-box:8000/v1."
    ),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="With --backend openai: the served model's tokenizer, for profile memory."
    ),
) -> None:
    """Serve MODEL over HTTP: POST /v1/chat/completions (OpenAI's API, streamed or not), /v1/models, /healthz,
    and /v1/seekers/ID (what is stored about a seeker: GET to read it, DELETE to erase it). docs/serving.md."""
    from esc_evolve.cli.model_arg import resolve_model, served_tokenizer
    from esc_evolve.logging_setup import setup_logging

    try:
        from esc_evolve.serving.app import serve as run_server
    except ImportError as exc:
        raise EscEvolveError(f"serving needs the 'serving' extra: pip install 'esc-evolve[serving]' ({exc})") from None

    address = [*([f"serve.host={host}"] if host else []), *([f"serve.port={port}"] if port is not None else [])]
    cfg, model_config, adapter, label = resolve_model(
        model, config, [*(overrides or []), *address], backend=backend, base_url=base_url
    )
    setup_logging(cfg.run.log_level)
    where = f"http://{cfg.serve.host}:{cfg.serve.port}/v1 ({cfg.generation.backend} backend)"
    console.print(f"serving [bold]{escape(label)}[/bold] at {where}", highlight=False)
    remote_tokenizer = None
    if tokenizer is not None and cfg.generation.backend == "openai":
        remote_tokenizer = served_tokenizer(model_config, tokenizer)
    config_served = cfg.model_copy(update={"model": model_config})
    run_server(config_served, model_name=model, adapter=adapter, tokenizer=remote_tokenizer)
