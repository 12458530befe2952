"""A run directory keeps everything a run made: resolved config, seed, versions, logs, stage artifacts.

Layout (mirrors the method): `config.yaml`, `meta.json`, `logs/run.log`, `stages.json`, `m0/`,
`iter1/pairs.jsonl`, `iter1/m1/`, ..., `eval/`, `report.html`.

A stage that finished is recorded in `stages.json` (written atomically) with its summary, and is not redone
on `--resume`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from esc_evolve.config import ExperimentConfig, dump_config, validate_config
from esc_evolve.errors import ConfigError

_UMASK = os.umask(0)
os.umask(_UMASK)

TRACKED_PACKAGES = (
    "esc-evolve",
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "pydantic",
)


class RunDir:
    def __init__(self, path: Path, config: ExperimentConfig) -> None:
        self.path = path
        self.config = config

    @classmethod
    def create(cls, config: ExperimentConfig, resume: bool = False) -> RunDir:
        """Make (or, with resume, reopen) `output_dir/name`. Resuming needs the same resolved config."""
        path = Path(config.run.output_dir).expanduser() / config.run.name
        saved = path / "config.yaml"
        if saved.exists():
            if not resume:
                raise ConfigError(
                    f"run directory {path} already exists: add --resume to continue it, "
                    f"or pick another name with --set run.name=NAME"
                )
            previous = validate_config(_read_yaml(saved), source=str(saved))
            if previous != config:
                raise ConfigError(
                    f"{saved} differs from the config given now; a resumed run must use the same config "
                    f"(start a new run with --set run.name=NAME to change it)"
                )
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path, config)
        if not saved.exists():
            write_atomic(saved, dump_config(config))
            write_json_atomic(path / "meta.json", environment_metadata(config))
        return run

    @property
    def log_file(self) -> Path:
        return self.path / "logs" / "run.log"

    def stage_done(self, stage: str) -> bool:
        return stage in self._stages()

    def stage_summary(self, stage: str) -> dict[str, Any]:
        return self._stages()[stage]

    def mark_done(self, stage: str, summary: dict[str, Any]) -> None:
        stages = self._stages()
        stages[stage] = {"finished": _now(), **summary}
        write_json_atomic(self.path / "stages.json", stages)

    def _stages(self) -> dict[str, Any]:
        file = self.path / "stages.json"
        return json.loads(file.read_text(encoding="utf-8")) if file.exists() else {}


def environment_metadata(config: ExperimentConfig) -> dict[str, Any]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "started": _now(),
        "seed": config.run.seed,
        "command": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": _git_commit(),
    }


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results should read like any other file
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
