"""Safety checks for text that reaches or comes from the model (crisis signals, unsafe replies)."""

from esc_evolve.safety.crisis import gives_crisis_resources, seeker_at_risk, unsafe_reply

__all__ = ["gives_crisis_resources", "seeker_at_risk", "unsafe_reply"]
