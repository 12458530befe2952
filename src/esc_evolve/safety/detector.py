"""Risk detection on a seeker's message: the fine-tuned classifier of `safety.model`, with the rule floor under it.

A long message is also read in windows of two sentences, so that one sentence of risk inside a message about
something else is not averaged away; the highest score wins. With a history, a short reply ("yes", "tonight")
right after a seeker message at risk is at least `concern`: risk said across two turns. The rules of
`safety.rules` are a floor: an explicit phrase is at least `concern` whatever the classifier says.

Levels: `urgent` = a plan, means, timing, an act under way, a request for methods, or danger from another person
now; `concern` = at risk without those; `none`. The thresholds favour recall (see docs/safety.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from esc_evolve.safety.dataset import RISK_CATEGORIES, Level, RiskExample, esconv_negatives, load_risk_examples
from esc_evolve.safety.rules import URGENT_RULES, risk_rule_categories

log = logging.getLogger(__name__)

# Chosen on the train split for recall (benchmarks/safety.py prints the held-out figures); never on the test split.
AT_RISK_THRESHOLD = 0.5
URGENT_THRESHOLD = 0.5
WINDOW_SENTENCES = 2
MIN_WORDS_TO_SPLIT = 25
SHORT_REPLY_WORDS = 6
# ESConv train seeker turns added as negatives when the user opts in (see `esconv_train_file`).
ESCONV_ENV = "ESC_EVOLVE_SAFETY_ESCONV"
ESCONV_NEGATIVES = 2000

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


class RiskPredictor(Protocol):
    def predict(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(n, 3) level probabilities (none, concern, urgent) and (n, 10) risk-category probabilities."""
        ...


@dataclass(frozen=True)
class RiskAssessment:
    """What the detector found in one message. `score` is the at-risk probability of the riskiest part."""

    level: Level
    score: float
    categories: tuple[str, ...]
    reason: str

    @property
    def at_risk(self) -> bool:
        return self.level != "none"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "categories": list(self.categories)}


class RiskDetector:
    """`assess(text, history)`: the classifier, the rule floor, and the thresholds."""

    def __init__(
        self,
        model: RiskPredictor,
        at_risk_threshold: float = AT_RISK_THRESHOLD,
        urgent_threshold: float = URGENT_THRESHOLD,
    ) -> None:
        self.model = model
        self.at_risk_threshold = at_risk_threshold
        self.urgent_threshold = urgent_threshold

    def assess(self, text: str, history: Sequence[str] | None = None) -> RiskAssessment:
        """Risk in the seeker's message `text`; `history` holds the seeker's earlier messages, oldest first."""
        return self.assess_many([text], [history] if history else None)[0]

    def assess_many(
        self, texts: Sequence[str], histories: Sequence[Sequence[str] | None] | None = None
    ) -> list[RiskAssessment]:
        """`assess` for many messages in one batched pass (evaluation, benchmarks, files)."""
        previous = [
            _previous_for_short_reply(text, histories[i] if histories else None) for i, text in enumerate(texts)
        ]
        messages = [*texts, *[p for p in previous if p is not None]]
        parts = [message_parts(text) for text in messages]
        levels, categories = self.model.predict([part for message in parts for part in message])
        assessed, start = [], 0
        for text, message in zip(messages, parts, strict=True):
            rows = slice(start, start + len(message))
            assessed.append(self._decide(text, message, levels[rows], categories[rows]))
            start += len(message)
        earlier = iter(assessed[len(texts) :])
        own = assessed[: len(texts)]
        return [_carry_over(a, next(earlier) if p is not None else None) for a, p in zip(own, previous, strict=True)]

    def _decide(self, text: str, parts: list[str], levels: np.ndarray, categories: np.ndarray) -> RiskAssessment:
        at_risk = 1.0 - levels[:, 0]
        top = int(np.argmax(at_risk))
        score, urgent = float(at_risk[top]), float(levels[:, 2].max())
        rules = risk_rule_categories(text)
        if score < self.at_risk_threshold and not rules:
            return RiskAssessment("none", round(score, 4), (), "no risk signal")
        level: Level = "urgent" if urgent >= self.urgent_threshold or URGENT_RULES & set(rules) else "concern"
        found = tuple(dict.fromkeys([*rules, *_top_categories(categories[top])]))
        reason = _reason(score, parts[top], rules, self.at_risk_threshold)
        return RiskAssessment(level, round(max(score, self.at_risk_threshold if rules else 0.0), 4), found, reason)


def _top_categories(proba: np.ndarray) -> list[str]:
    order = np.argsort(-proba)
    return [RISK_CATEGORIES[i] for i in order if proba[i] >= 0.5] or [RISK_CATEGORIES[int(order[0])]]


def message_parts(text: str) -> list[str]:
    """What is classified for one message: the whole text and, for a long one, windows of two sentences."""
    parts = [text]
    sentences = [s for s in _SENTENCE.split(text) if s.strip()]
    if len(text.split()) >= MIN_WORDS_TO_SPLIT and len(sentences) > WINDOW_SENTENCES:
        for start in range(0, len(sentences) - WINDOW_SENTENCES + 1):
            parts.append(" ".join(sentences[start : start + WINDOW_SENTENCES]))
    return parts


def _previous_for_short_reply(text: str, history: Sequence[str] | None) -> str | None:
    """The previous seeker message, when this one is a short reply ("yes", "tonight") that only means something
    with it. Joining the two into one text was tried and flagged ordinary chat (benchmarks/README.md)."""
    return history[-1] if history and len(text.split()) < SHORT_REPLY_WORDS else None


def _carry_over(own: RiskAssessment, previous: RiskAssessment | None) -> RiskAssessment:
    if own.at_risk or previous is None or not previous.at_risk:
        return own
    reason = f"a short reply right after a message at risk ({previous.reason})"
    return RiskAssessment("concern", previous.score, previous.categories, reason)


def _reason(score: float, part: str, rules: list[str], threshold: float) -> str:
    said = part if len(part) <= 80 else part[:77] + "..."
    found = [f"explicit phrase ({', '.join(rules)})"] if rules else []
    if score >= threshold:
        found.append(f"classifier {score:.2f} on {said!r}")
    return "; ".join(found)


def load_or_train(examples: Sequence[RiskExample], cache_dir: Path, progress: bool = True) -> Any:
    """The fine-tuned classifier for `examples`: from the cache, or trained once and cached."""
    from esc_evolve.evaluation.embedding import packaged_model_dir
    from esc_evolve.safety.model import RECIPE, fine_tune, load_model, save_model

    encoder = packaged_model_dir()
    key = json.dumps([RECIPE, encoder.parent.name, [(e.text, e.level, e.categories) for e in examples]])
    folder = Path(cache_dir) / "safety" / hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    if (folder / "heads.pt").is_file():
        return load_model(folder)
    log.info("training the risk detector on %d messages (once per machine, cached in %s)", len(examples), folder)
    model = fine_tune(encoder, examples, progress=progress)
    save_model(model, folder, {"recipe": RECIPE, "encoder": str(encoder), "examples": len(examples)})
    return model


def esconv_train_file() -> Path | None:
    """The ESConv *train* file whose seeker turns add negatives, or None (the default): only where the user asks for
    it with `$ESC_EVOLVE_SAFETY_ESCONV=PATH`. Opt-in because it trades recall for fewer false alarms on real chat
    (docs/safety.md, "Measured"): a crisis detector's default keeps recall."""
    setting = os.environ.get(ESCONV_ENV, "").strip()
    return None if setting.lower() in ("", "off", "0", "none") else Path(setting).expanduser()


def training_examples(esconv_train: Path | None) -> list[RiskExample]:
    """The packaged train split, plus `ESCONV_NEGATIVES` ESConv train seeker turns as negatives when a file is given."""
    examples = load_risk_examples(split="train")
    if esconv_train is not None:
        examples += esconv_negatives(esconv_train, ESCONV_NEGATIVES)
    return examples


@functools.cache
def default_detector(cache_dir: Path | None = None) -> RiskDetector:
    """The packaged detector: MiniLM fine-tuned on the packaged train split (plus ESConv train seeker turns as
    negatives where the user opts in, `esconv_train_file`); trained once per machine and setting, cached."""
    from esc_evolve.evaluation.embedding import default_cache_dir

    esconv = esconv_train_file()
    log.info("risk detector: %s", f"with negatives from {esconv}" if esconv else "packaged labelled set only")
    return RiskDetector(load_or_train(training_examples(esconv), cache_dir or default_cache_dir()))


def assess(text: str, history: Sequence[str] | None = None) -> RiskAssessment:
    """Risk in a seeker's message with the packaged detector: level none | concern | urgent, score, categories,
    and the reason. A floor, not a clinical tool (docs/safety.md)."""
    return default_detector().assess(text, history)
