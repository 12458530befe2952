"""What metric functions share: the table, the settings and expensive resources built once, on first use."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from esc_evolve.evaluation.embedding import Embedder, default_cache_dir, load_default_embedder
from esc_evolve.evaluation.judge.base import Judge
from esc_evolve.evaluation.responses import ResponsesTable
from esc_evolve.evaluation.settings import EvaluationSettings

if TYPE_CHECKING:
    from esc_evolve.evaluation.strategy import StrategyClassifier
    from esc_evolve.safety.detector import RiskDetector

__all__ = ["EvalContext", "Judge"]


@dataclass
class EvalContext:
    """Passed to every metric. `embedder`, `classifier` and `judge` may be injected (tests pass fakes)."""

    table: ResponsesTable
    settings: EvaluationSettings = field(default_factory=EvaluationSettings)
    embedder_override: Embedder | None = None
    classifier_override: StrategyClassifier | None = None
    judge: Judge | None = None
    out_dir: Path | None = None  # where metrics may write raw records (judge outputs)
    notes: list[str] = field(default_factory=list)  # skipped metrics and other caveats for the report

    @property
    def cache_dir(self) -> Path:
        return Path(self.settings.cache_dir).expanduser() if self.settings.cache_dir else default_cache_dir()

    @functools.cached_property
    def embedder(self) -> Embedder:
        return self.embedder_override or load_default_embedder(self.cache_dir)

    @functools.cached_property
    def classifier(self) -> StrategyClassifier:
        if self.classifier_override is not None:
            return self.classifier_override
        from esc_evolve.evaluation.strategy import load_or_train_classifier

        return load_or_train_classifier(
            self.settings.strategy_train_path,
            self.embedder,
            self.cache_dir,
            valid_path=self.settings.strategy_valid_path,
            data=self.settings.data,
        )

    @functools.cached_property
    def risk_detector(self) -> RiskDetector:
        """The safety layer's packaged detector (trained once per machine, in the default cache)."""
        from esc_evolve.safety.detector import default_detector

        return default_detector()

    embedding_memo: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embeddings memoised per text within a run (responses are embedded by several metrics)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self.embedding_memo))
        if missing:
            for text, vector in zip(missing, self.embedder.encode(missing), strict=True):
                self.embedding_memo[text] = vector
        return np.stack([self.embedding_memo[t] for t in texts]) if texts else np.zeros((0, 0))
