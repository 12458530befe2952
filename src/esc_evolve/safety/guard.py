"""The guard chat and serving put around the model: assess the seeker's message before the model sees it, check
the model's reply before the seeker sees it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from esc_evolve.config import SafetySettings
from esc_evolve.safety.detector import RiskAssessment, RiskDetector, default_detector
from esc_evolve.safety.reply import resources_note, safe_reply
from esc_evolve.safety.rules import gives_crisis_resources, unsafe_reply


@dataclass(frozen=True)
class GuardedTurn:
    """The assessment of a seeker message, and the safe reply to give instead of the model's (None: ask it)."""

    assessment: RiskAssessment
    reply: str | None


class SafetyGuard:
    def __init__(self, settings: SafetySettings | None = None, detector: RiskDetector | None = None) -> None:
        self.settings = settings or SafetySettings()
        self.detector = detector or default_detector()

    def before(self, message: str, history: Sequence[str] | None = None) -> GuardedTurn:
        """Assess the seeker's message; at a level in `safety.reply_on` the safe reply answers, not the model."""
        assessment = self.detector.assess(message, history)
        if assessment.level in self.settings.reply_on:
            return GuardedTurn(assessment, safe_reply(assessment, self.settings))
        return GuardedTurn(assessment, None)

    def after(self, reply: str, assessment: RiskAssessment) -> str:
        """The model's reply as shown: replaced when it encourages harm; resources added for a seeker at risk
        when it gives none."""
        if unsafe_reply(reply):
            return safe_reply(assessment, self.settings)
        if assessment.at_risk and not gives_crisis_resources(reply):
            return f"{reply}\n\n{resources_note(assessment, self.settings)}"
        return reply
