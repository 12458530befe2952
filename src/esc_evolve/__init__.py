"""esc-evolve: self-evolution of LLMs into personalised emotional supporters."""

__version__ = "0.1.0"
