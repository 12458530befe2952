"""`esc-evolve compare`: several runs' models in one table against one baseline row (`scoring.py`: the numbers;
`report.py`: compare.md, compare.html, compare.json). See docs/experiments.md."""

from esc_evolve.evaluation.compare.report import write_comparison
from esc_evolve.evaluation.compare.scoring import Comparison, compare_runs, config_key, seed_groups

__all__ = ["Comparison", "compare_runs", "config_key", "seed_groups", "write_comparison"]
