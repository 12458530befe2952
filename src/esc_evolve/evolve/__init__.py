"""Phase 2, self-improvement: one iteration's data, made without a run directory.

`principles.yaml` / `principles.py`: what to infer and what good support is; `reflection.py`: ask each field after
a fixed prefix and parse it (label cues from `data/vocabulary.yaml`); `refinement.py`: the system message that
carries the reflection into y'; `filters.py`: which (y', y) pairs are kept; `pairs.py`: the append-only record
of every context; `loop.py`: `select_contexts` and `generate_pairs`, the iteration itself.
"""
