"""Phase 2, self-improvement: one iteration's data, made without a run directory.

`principles.yaml` / `principles.py`: what to infer and what good support is; `reflection.py`: ask each field after
a fixed prefix and parse it (label cues from `data/vocabulary.yaml`), aggregate k answers, apply a field's check;
`exemplars.py` (+ `exemplars.yaml`): few-shot exemplars and generic-answer probes from the built-in training
conversations; `grounding.py`: content words, and whether a text names something the seeker said; `roles.py`: a
supporter who speaks as the seeker; `refinement.py`: the system message that carries the reflection into y';
`filters.py`: which (y', y) pairs are kept; `pairs.py`: the append-only record of every context; `quality.py`: the
iteration's reflection and filter statistics; `loop.py`: `select_contexts` and `generate_pairs`, the iteration.
"""
