"""`esc-evolve run`: the whole method in one run directory, stage after stage.

    prepare      load and check the data, resolve the backbone, one smoke reply       prepare.json
    sft          phase 1: LoRA SFT of the backbone                                    m0/
    iterN.pairs  phase 2: M_{N-1} answers, reflects, refines; filtered pairs          iterN/pairs.jsonl
    iterN.dpo    phase 2: DPO of M_{N-1} on its pairs, reference M_{N-1}              iterN/mN/
    eval         every model answers the eval contexts; metrics, CIs, report          report.html

The pipeline owns the run directory: `layout.py` decides where every artifact lives, `rundir.py` records the
config and the finished stages, `stages.py` reads each stage's inputs from the layout and calls the stage
functions of training/, evolve/ and evaluation/ (which know nothing of run directories), and `evaluation.py`
generates the responses that evaluation scores. A stage recorded as finished is skipped on `--resume`; a stage
killed midway continues from what it saved (pairs are appended per chunk, training resumes from checkpoints).
One process at a time writes a run directory (`RunLock`, RUN/.lock). On GPUs `esc-evolve run` is an orchestrator
that starts each stage in its own process (`processes.py`, `run.stage_processes`), training under `accelerate
launch`; it alone holds the lock and writes stages.json.
"""

from esc_evolve.pipeline.layout import RunLayout
from esc_evolve.pipeline.rundir import RunDir, RunLock
from esc_evolve.pipeline.stages import run_pipeline, stages

__all__ = ["RunDir", "RunLayout", "RunLock", "run_pipeline", "stages"]
