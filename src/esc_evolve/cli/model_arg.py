"""The MODEL argument of `generate`, `chat` and `serve`: a backbone, a LoRA adapter folder, a run's model or a run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from esc_evolve.errors import ConfigError

if TYPE_CHECKING:
    from esc_evolve.config import ExperimentConfig, ModelSettings


def model_and_adapter(base: ModelSettings, model: str | None) -> tuple[ModelSettings, Path | None]:
    """(model config, adapter folder or None): a LoRA adapter folder applies to `base`; anything else names a
    backbone (alias, folder or hub id)."""
    if model is None:
        return base, None
    folder = Path(model).expanduser()
    if (folder / "adapter_config.json").is_file():
        return base, folder
    return base.model_copy(update={"name": model}), None


def resolve_model(
    model: str,
    config: Path | None,
    overrides: list[str] | None,
    *,
    backend: str | None = None,
    base_url: str | None = None,
) -> tuple[ExperimentConfig, ModelSettings, Path | None, str]:
    """(config, model settings, adapter folder or None, a label) for MODEL.

    A run directory means its newest model (`RunLayout.model_names()`), `RUN/m0` and `RUN/iterN/mN` that model;
    either way the run's config.yaml is the config unless `config` is given. Anything else is resolved as
    `esc-evolve generate --model` does: a LoRA adapter folder applied to its recorded base, or a backbone alias,
    folder or hub id. With the openai backend MODEL is the served model's name and nothing is loaded here. A run
    that has no trained model yet is an error.
    """
    from esc_evolve.config import load_config

    if backend == "openai":
        cfg = load_config(config, overrides)
        return _with_backend(cfg, backend, base_url), cfg.model.model_copy(update={"name": model}), None, model
    run = _run_model(Path(model).expanduser())
    if run is not None:
        layout, name = run
        cfg = _with_backend(load_config(config or layout.config_file, overrides), backend, base_url)
        return cfg, cfg.model, layout.adapter_of(name), f"{name} of {layout.root}"
    cfg = _with_backend(load_config(config, overrides), backend, base_url)
    model_config, adapter = model_and_adapter(cfg.model, model)
    return cfg, model_config, adapter, model


def _run_model(folder: Path) -> tuple[Any, str] | None:
    """(layout, model name) when `folder` is a run directory (its newest model), or its m0/ or iterN/mN/."""
    from esc_evolve.pipeline.layout import BASE, RunLayout

    if RunLayout(folder).config_file.is_file():
        layout = RunLayout(folder)
        newest = layout.model_names()[-1]
        if newest == BASE:
            raise ConfigError(f"{folder} holds no trained model yet (no m0/adapter_config.json)")
        return layout, newest
    name = folder.name
    if not (name.startswith("m") and name[1:].isdigit()):
        return None
    for layout in (RunLayout(folder.parent), RunLayout(folder.parent.parent)):
        if layout.config_file.is_file() and layout.model_dir(int(name[1:])).resolve() == folder.resolve():
            return layout, name
    return None


def served_tokenizer(model_config: ModelSettings, name: str) -> Any:
    """`--tokenizer`: a LoRA folder of a run (its saved tokenizer, else its base's), or a backbone."""
    from esc_evolve.models import load_tokenizer

    folder = Path(name).expanduser()
    if (folder / "adapter_config.json").is_file():
        return load_tokenizer(model_config, folder)
    return load_tokenizer(model_config.model_copy(update={"name": name}))


def _with_backend(cfg: ExperimentConfig, backend: str | None, base_url: str | None) -> ExperimentConfig:
    generation = cfg.generation
    if backend is not None:
        generation = generation.model_copy(update={"backend": backend})
    if base_url is not None:
        if generation.backend != "openai":
            raise ConfigError("--base-url goes with --backend openai (a remote OpenAI-compatible engine)")
        openai = generation.openai.model_copy(update={"base_url": base_url})
        generation = generation.model_copy(update={"openai": openai})
    return cfg.model_copy(update={"generation": generation})
