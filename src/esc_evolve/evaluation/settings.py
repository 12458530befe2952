"""Settings of an evaluation run: `config.EvalSettings` (documented there) plus the run seed and how data is read."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from esc_evolve.config import DataSettings, EvalSettings, ExperimentConfig
from esc_evolve.errors import ConfigError


class EvaluationSettings(EvalSettings):
    """What `evaluate` needs: the eval section of the config plus the seed of the run."""

    seed: int = 42
    data: DataSettings = DataSettings()  # how the strategy classifier's labelled files are read (skip_invalid)

    @classmethod
    def for_experiment(cls, config: ExperimentConfig) -> EvaluationSettings:
        """The eval section with the run's seed, and the data and cache paths it defaults to."""
        return cls.from_eval_config(
            config.eval,
            seed=config.run.seed,
            strategy_train_path=config.eval.strategy_train_path or config.data.train_path,
            strategy_valid_path=config.eval.strategy_valid_path or config.data.valid_path,
            cache_dir=config.eval.cache_dir or config.model.cache_dir,
            data=config.data,
        )

    @classmethod
    def from_eval_config(cls, eval_config: EvalSettings, **overrides: Any) -> EvaluationSettings:
        """The config's eval section, then the overrides that are not None."""
        # Nested blocks are passed as objects, not dumped: `eval.judge.openai` must keep which fields were set
        # explicitly (those override `generation.openai`, see judge.backends.judge_endpoint).
        source = eval_config.model_copy(deep=True)
        values = {name: getattr(source, name) for name in EvalSettings.model_fields}
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid evaluation settings: {problems}") from None
