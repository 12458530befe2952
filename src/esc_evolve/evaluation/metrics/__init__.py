"""Built-in metrics; importing this package registers them (see registry.py)."""

from esc_evolve.evaluation.metrics import (  # noqa: F401
    judge,
    personalisation,
    reference,
    reflection,
    safety,
    strategy_behaviour,
    unhelpful,
)
