"""Settings of an evaluation run: `config.EvalConfig` (documented there) plus the run seed."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from esc_evolve.config import EvalConfig, ExperimentConfig
from esc_evolve.errors import ConfigError


class EvaluationSettings(EvalConfig):
    """What `evaluate` needs: the eval section of the config plus the seed of the run."""

    seed: int = 42

    @classmethod
    def for_experiment(cls, config: ExperimentConfig) -> EvaluationSettings:
        """The eval section with the run's seed, and the data and cache paths it defaults to."""
        return cls.from_eval_config(
            config.eval,
            seed=config.run.seed,
            strategy_train_path=config.eval.strategy_train_path or config.data.train_path,
            strategy_valid_path=config.eval.strategy_valid_path or config.data.valid_path,
            cache_dir=config.eval.cache_dir or config.model.cache_dir,
        )

    @classmethod
    def from_eval_config(cls, eval_config: EvalConfig, **overrides: Any) -> EvaluationSettings:
        """The config's eval section, then the overrides that are not None."""
        values = eval_config.model_dump()
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid evaluation settings: {problems}") from None
