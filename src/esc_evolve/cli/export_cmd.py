"""`esc-evolve export MODEL --out DIR`: one merged transformers folder that vLLM, TGI or transformers load."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from esc_evolve.cli.common import SetOption, console, user_errors


def register(app: typer.Typer) -> None:
    """Add the `export` command to `app`."""
    app.command("export")(export)


@user_errors
def export(
    model: str = typer.Argument(
        ...,
        help="A run directory (its newest model), a run's model (runs/NAME/m0, runs/NAME/iter2/m2), a LoRA adapter "
        "folder, or a backbone (alias, folder, hub id).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The folder to write; it must not exist or be empty."),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="float32, bfloat16 or float16; auto: what esc-evolve loads the model with (float32 on a CPU).",
    ),
    gguf: bool = typer.Option(
        False, "--gguf", help="Also write DIR/model.gguf for llama.cpp and Ollama (needs the extra 'export')."
    ),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML config. Default: the run's config.yaml when MODEL is in a run."
    ),
    overrides: list[str] | None = SetOption,
) -> None:
    """Write MODEL with its adapter chain merged in, its tokenizer and chat template, generation_config.json and
    esc_evolve_export.json: a folder that `vllm serve DIR`, TGI or AutoModelForCausalLM load as it is
    (docs/export.md)."""
    from esc_evolve.cli.model_arg import resolve_model
    from esc_evolve.logging_setup import setup_logging
    from esc_evolve.models.export import export_merged

    cfg, model_config, adapter, label = resolve_model(model, config, overrides)
    setup_logging(cfg.run.log_level)
    start = time.perf_counter()
    with console.status(f"loading {escape(label)} and merging its adapters"):
        folder = export_merged(
            model_config, adapter, out, dtype=dtype, generation=cfg.generation, gguf=gguf, force=force, source=model
        )
    _print_summary(folder, label, time.perf_counter() - start)


def _print_summary(folder: Path, label: str, seconds: float) -> None:
    table = Table("file", "size")
    for file in sorted(folder.iterdir()):
        table.add_row(escape(file.name), _size(file.stat().st_size))
    console.print(table)
    where = escape(str(folder))
    console.print(f"[green]done[/green] in {seconds:.1f} s: {escape(label)} -> {where}", highlight=False)
    console.print(f"load it with `vllm serve {where}` or AutoModelForCausalLM.from_pretrained", highlight=False)


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB"):
        if count < 1000:
            return f"{count:.0f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"
