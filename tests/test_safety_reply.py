"""The safe reply and the guard around the model (resources from config, never a method, unsafe replies replaced)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from esc_evolve.config import CrisisResource, SafetySettings, load_config
from esc_evolve.safety import RiskAssessment, SafetyGuard, gives_crisis_resources, safe_reply, unsafe_reply


def risk(level: str, *categories: str) -> RiskAssessment:
    return RiskAssessment(level, 0.9 if level != "none" else 0.1, tuple(categories), "test")


class FixedDetector:
    """Answers with a given assessment: the guard's decisions are tested apart from the classifier's."""

    def __init__(self, assessment: RiskAssessment) -> None:
        self.assessment = assessment
        self.seen: list[tuple[str, Sequence[str] | None]] = []

    def assess(self, text: str, history: Sequence[str] | None = None) -> RiskAssessment:
        self.seen.append((text, history))
        return self.assessment


@pytest.mark.parametrize(
    "assessment",
    [risk("urgent", "plan_or_means"), risk("concern", "hopelessness"), risk("urgent", "danger_from_others")],
)
def test_safe_reply_asks_about_safety_gives_resources_and_never_encourages(assessment: RiskAssessment) -> None:
    reply = safe_reply(assessment, SafetySettings())
    assert "safe" in reply.lower() and "?" in reply
    assert "local emergency number" in reply
    assert "988" in reply and "116 123" in reply and "findahelpline.com" in reply
    assert gives_crisis_resources(reply) and not unsafe_reply(reply)


def test_category_specific_resources_only_where_they_fit() -> None:
    settings = SafetySettings()
    assert "1-800-799-7233" in safe_reply(risk("urgent", "danger_from_others"), settings)
    assert "1-800-799-7233" not in safe_reply(risk("urgent", "plan_or_means"), settings)
    assert "none of it is your fault" in safe_reply(risk("urgent", "danger_from_others"), settings)
    assert "looking out for them" in safe_reply(risk("concern", "third_party_at_risk"), settings)


def test_resources_for_a_region_come_from_the_config(tmp_path) -> None:
    config = tmp_path / "de.yaml"
    config.write_text(
        "safety:\n  emergency_note: 'In an emergency call 112 first.'\n  resources:\n"
        "    - {name: TelefonSeelsorge, contact: '0800 111 0 111', region: Germany}\n",
        encoding="utf-8",
    )
    settings = load_config(config).safety
    reply = safe_reply(risk("urgent", "suicidal_thoughts"), settings)
    assert "TelefonSeelsorge (Germany): 0800 111 0 111" in reply and "call 112 first" in reply
    assert "988" not in reply


def test_guard_answers_urgent_messages_itself_and_lets_the_model_answer_concern_by_default() -> None:
    urgent = SafetyGuard(SafetySettings(), FixedDetector(risk("urgent", "plan_or_means")))
    turn = urgent.before("the pills are on the table", ["I can't do this anymore"])
    assert turn.reply is not None and "988" in turn.reply
    concern = SafetyGuard(SafetySettings(), FixedDetector(risk("concern", "hopelessness")))
    assert concern.before("nothing will ever change").reply is None
    configured = SafetyGuard(SafetySettings(reply_on=["urgent", "concern"]), FixedDetector(risk("concern", "burden")))
    assert configured.before("they'd be relieved if I was gone").reply is not None


def test_guard_checks_the_models_reply_before_it_is_shown() -> None:
    guard = SafetyGuard(SafetySettings(), FixedDetector(risk("none")))
    shown = guard.after("You should just do it.", risk("none"))
    assert "You should just do it" not in shown and gives_crisis_resources(shown)
    assert guard.after("That sounds like a long week.", risk("none")) == "That sounds like a long week."
    at_risk = guard.after("I hear how tired you are.", risk("concern", "hopelessness"))
    assert at_risk.startswith("I hear how tired you are.") and "988" in at_risk


def test_resources_are_validated() -> None:
    with pytest.raises(ValueError):
        CrisisResource(name="x")  # no contact
