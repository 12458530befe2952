"""Phase 2, self-improvement: principles, reflection, refinement, preference pairs, the evolve loop."""
