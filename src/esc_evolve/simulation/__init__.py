"""Simulated seekers: role cards with hidden profiles and strategy preferences (data/ROLE_CARDS.md)."""

from esc_evolve.simulation.cards import (
    Persona,
    RiskFlag,
    RoleCard,
    from_esc_eval,
    load_role_cards,
    packaged_cards_path,
    parse_role_card,
)

__all__ = [
    "Persona",
    "RiskFlag",
    "RoleCard",
    "from_esc_eval",
    "load_role_cards",
    "packaged_cards_path",
    "parse_role_card",
]
