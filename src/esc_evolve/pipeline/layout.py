"""`RunLayout`: the one place that knows where each artifact of a run lives.

    RUN/config.yaml  meta.json  stages.json  .lock  logs/run.log  logs/tensorboard/<stage>/
    RUN/logs/stages/<stage>.log  <stage>.json               a stage run in its own process: output, summary
    RUN/prepare.json
    RUN/m0/  m0-merged/  sft-checkpoints/                   phase 1 (M0)
    RUN/iterN/pairs.jsonl  preference.jsonl  dpo-checkpoints/  mN/     phase 2, iteration N (M_N)
    RUN/iterN/anchor.jsonl                                    M0's replies, the rejected side (evolve.rejected_from)
    RUN/iterN/sft-checkpoints/                                M_N by SFT on human replies (evolve.update: sft)
    RUN/eval/responses.jsonl  generation_time.json  (+ judge records)   evaluation
    RUN/report.html  report.md  metrics.json  plots/          the report

Stage functions never build these paths: the pipeline asks the layout and passes the paths in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from esc_evolve.config import RunSettings

BASE = "base"  # the backbone without adapter
HUMAN = "human"  # the reference replies (not a model folder)
REFINE = "+refine"  # `mK+refine`: M_K answering through draft, reflection and refinement at answer time
_ITERATED = re.compile(r"m(\d+)(?:\+refine)?")


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def of(cls, run: RunSettings) -> RunLayout:
        return cls(Path(run.output_dir).expanduser() / run.name)

    # Bookkeeping of the run itself
    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def meta_file(self) -> Path:
        return self.root / "meta.json"

    @property
    def stages_file(self) -> Path:
        return self.root / "stages.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / "run.log"

    def tensorboard_dir(self, stage: str) -> Path:
        return self.root / "logs" / "tensorboard" / stage

    # A stage run in its own process (pipeline/processes.py): its output and the summary it hands back
    def stage_log_file(self, stage: str) -> Path:
        return self.root / "logs" / "stages" / f"{stage}.log"

    def stage_summary_file(self, stage: str) -> Path:
        return self.root / "logs" / "stages" / f"{stage}.json"

    @property
    def prepare_file(self) -> Path:
        return self.root / "prepare.json"

    # Models: M0 after SFT, M_N after iteration N
    def model_dir(self, iteration: int) -> Path:
        return self.root / "m0" if iteration == 0 else self.iteration_dir(iteration) / f"m{iteration}"

    @property
    def merged_m0_dir(self) -> Path:
        return self.root / "m0-merged"

    @property
    def sft_work_dir(self) -> Path:
        return self.root / "sft-checkpoints"

    # Self-evolution iterations
    def iteration_dir(self, iteration: int) -> Path:
        return self.root / f"iter{iteration}"

    def pairs_file(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "pairs.jsonl"

    def preference_file(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "preference.jsonl"

    def dpo_work_dir(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "dpo-checkpoints"

    def anchor_file(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "anchor.jsonl"

    def sft_more_work_dir(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "sft-checkpoints"

    def iterations(self) -> list[int]:
        """The iterations that have a folder, in order."""
        found = (p.name.removeprefix("iter") for p in self.root.glob("iter*"))
        return sorted(int(n) for n in found if n.isdigit())

    # Evaluation and report
    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def responses_file(self) -> Path:
        return self.eval_dir / "responses.jsonl"

    @property
    def generation_time_file(self) -> Path:
        return self.eval_dir / "generation_time.json"

    @property
    def report_dir(self) -> Path:
        return self.root

    # Models by name: base, m0, m1, ...
    def adapter_of(self, name: str) -> Path | None:
        """The adapter folder of model `name` (`base`: None, the backbone itself; `mK+refine`: M_K's); ValueError
        for other names."""
        if name == BASE:
            return None
        match = _ITERATED.fullmatch(name)
        if not match:
            raise ValueError(f"not a model of a run: {name!r} (expected base, m0, m1, ..., or mK{REFINE})")
        return self.model_dir(int(match.group(1)))

    def has_model(self, name: str) -> bool:
        adapter = self.adapter_of(name)
        return adapter is None or (adapter / "adapter_config.json").is_file()

    def model_names(self) -> list[str]:
        """base, m0 and every mN whose adapter exists, in order."""
        names = [BASE, "m0", *(f"m{k}" for k in self.iterations())]
        return [n for n in names if self.has_model(n)]


def refines_at_inference(name: str) -> bool:
    """Whether model `name` answers through draft, reflection and refinement (`mK+refine`)."""
    return name.endswith(REFINE)
