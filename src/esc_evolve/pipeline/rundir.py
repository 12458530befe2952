"""A run directory: the resolved config, seed, versions and the record of finished stages.

A stage that finished is recorded in `stages.json` (written atomically) with its summary, and is not redone on
`--resume`. Where things live is `RunLayout`'s business.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from esc_evolve.config import ExperimentConfig, dump_config, validate_config
from esc_evolve.errors import ConfigError
from esc_evolve.pipeline.layout import RunLayout
from esc_evolve.provenance import environment, now
from esc_evolve.storage import write_atomic, write_json_atomic


class RunDir:
    def __init__(self, layout: RunLayout, config: ExperimentConfig) -> None:
        self.layout = layout
        self.config = config

    @property
    def path(self) -> Path:
        return self.layout.root

    @classmethod
    def create(cls, config: ExperimentConfig, resume: bool = False) -> RunDir:
        """Make (or, with resume, reopen) `output_dir/name`. Resuming needs the same resolved config."""
        layout = RunLayout.of(config.run)
        saved = layout.config_file
        if saved.exists():
            if not resume:
                raise ConfigError(
                    f"run directory {layout.root} already exists: add --resume to continue it, "
                    f"or pick another name with --set run.name=NAME"
                )
            if read_run_config(layout.root) != config:
                raise ConfigError(
                    f"{saved} differs from the config given now; a resumed run must use the same config "
                    f"(start a new run with --set run.name=NAME to change it)"
                )
        layout.root.mkdir(parents=True, exist_ok=True)
        if not saved.exists():
            write_atomic(saved, dump_config(config))
            write_json_atomic(layout.meta_file, {"started": now(), "seed": config.run.seed, **environment()})
        return cls(layout, config)

    @property
    def log_file(self) -> Path:
        return self.layout.log_file

    def stage_done(self, stage: str) -> bool:
        return stage in self._stages()

    def stage_summary(self, stage: str) -> dict[str, Any]:
        return self._stages()[stage]

    def mark_done(self, stage: str, summary: dict[str, Any]) -> None:
        stages = self._stages()
        stages[stage] = {"finished": now(), **summary}
        write_json_atomic(self.layout.stages_file, stages)

    def _stages(self) -> dict[str, Any]:
        file = self.layout.stages_file
        return json.loads(file.read_text(encoding="utf-8")) if file.exists() else {}


def read_run_config(root: Path) -> ExperimentConfig:
    """The config a run directory was made with (old key names migrated)."""
    saved = RunLayout(root).config_file
    return validate_config(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}, source=str(saved))
