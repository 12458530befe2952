"""Talking to a model: one seeker's conversation behind the safety guard (`ChatSession`), with the conversation
and the profile that reflection infers kept per seeker in a local SQLite file (`SeekerStore`). Used by
`esc-evolve chat` and `esc-evolve serve` (docs/serving.md). A research tool, not a clinical one (docs/safety.md).
"""

from esc_evolve.serving.profile import infer_profile, profile_system_prompt
from esc_evolve.serving.session import ChatSession
from esc_evolve.serving.store import SeekerStore, default_db_path

__all__ = ["ChatSession", "SeekerStore", "default_db_path", "infer_profile", "profile_system_prompt"]
