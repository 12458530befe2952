"""Safety layer: risk in seeker messages, safe replies, unsafe model replies (docs/safety.md).

A floor, not a clinical tool: it catches what its labelled set and rules cover and will miss some people at risk.
"""

from esc_evolve.safety.detector import RiskAssessment, RiskDetector, assess, default_detector
from esc_evolve.safety.guard import GuardedTurn, SafetyGuard
from esc_evolve.safety.reply import safe_reply
from esc_evolve.safety.rules import gives_crisis_resources, risk_rule_categories, seeker_at_risk, unsafe_reply

__all__ = [
    "GuardedTurn",
    "RiskAssessment",
    "RiskDetector",
    "SafetyGuard",
    "assess",
    "default_detector",
    "gives_crisis_resources",
    "risk_rule_categories",
    "safe_reply",
    "seeker_at_risk",
    "unsafe_reply",
]
