"""The safe reply: what a seeker at risk is told instead of (or after) the model's reply.

Written as fixed text, not generated: a 135M model cannot be trusted to give a phone number right, and a reply to
a person in danger must never contain a method or agree with the plan. The text acknowledges the person, stays
with them, asks about immediate safety, and lists the configured resources after the local emergency number.
"""

from __future__ import annotations

from esc_evolve.config import CrisisResource, SafetySettings
from esc_evolve.safety.detector import RiskAssessment

_OPENING = {
    "danger_from_others": (
        "Thank you for telling me. What you describe sounds frightening, and none of it is your fault. "
        "Your safety matters most right now: are you somewhere safe at this moment?"
    ),
    "third_party_at_risk": (
        "It's good that you are looking out for them, and you don't have to carry this alone. "
        "If they may be in danger right now, please don't wait: stay with them if you can, or get someone to."
    ),
}
_SELF = (
    "I'm really glad you told me, and I'm here with you. What you're going through sounds incredibly painful, "
    "and you deserve support right now. Are you safe at this moment?"
)
_CLOSING = {
    "urgent": "Could you reach out to one of them now, or to someone near you who can be with you? "
    "I'll stay here while you do.",
    "concern": "If it would help, we can keep talking, and reaching one of them is always an option, day or night.",
}


def resources_for(assessment: RiskAssessment, settings: SafetySettings) -> list[CrisisResource]:
    """The configured resources that fit the assessment's categories (general ones always do)."""
    found = set(assessment.categories)
    return [r for r in settings.resources if not r.categories or found & set(r.categories)]


def resource_lines(assessment: RiskAssessment, settings: SafetySettings) -> str:
    lines = [f"- {r.name} ({r.region}): {r.contact}" for r in resources_for(assessment, settings)]
    return "\n".join([settings.emergency_note, *lines])


def safe_reply(assessment: RiskAssessment, settings: SafetySettings) -> str:
    """The full safe reply for a seeker at risk: acknowledgement, a safety question, resources, staying with them."""
    opening = next((_OPENING[c] for c in assessment.categories if c in _OPENING), _SELF)
    closing = _CLOSING["urgent" if assessment.level == "urgent" else "concern"]
    return f"{opening}\n\n{resource_lines(assessment, settings)}\n\n{closing}"


def resources_note(assessment: RiskAssessment, settings: SafetySettings) -> str:
    """A short note appended to a model reply that gives no resources to a seeker of concern."""
    return f"If things feel like too much, you don't have to face them alone.\n{resource_lines(assessment, settings)}"
