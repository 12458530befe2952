"""A run directory: the resolved config, seed, versions, the record of finished stages, and its one writer.

A stage that finished is recorded in `stages.json` (written atomically) with its summary, and is not redone on
`--resume`. `RunLock` keeps a second process from writing the same run. Where things live is `RunLayout`'s
business.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml

from esc_evolve.config import ExperimentConfig, dump_config, validate_config
from esc_evolve.errors import ConfigError, RunBusyError
from esc_evolve.pipeline.layout import RunLayout
from esc_evolve.provenance import environment, now
from esc_evolve.storage import write_atomic, write_json_atomic

log = logging.getLogger(__name__)


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


class RunLock:
    """One writer per run directory: an exclusive `flock` on `RUN/.lock`, a file that names the holder (pid, host).

    The kernel releases the lock when its process ends, even by SIGKILL, so a lock left by a dead process is free
    and the next writer takes it over, logging whose it was (the file still names it). The file is emptied on
    release, never deleted: a process could otherwise lock the deleted file while another locks a new one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise `RunBusyError` naming the process that holds it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunBusyError(
                f"run directory {self.path.parent} is being written by {_describe(_holder(self.path))}; only one "
                "process may write a run directory: wait for it to finish, or stop it and rerun with --resume"
            ) from None
        left = _holder(self.path)
        if left:  # not emptied by a release: its process ended without one (killed)
            log.warning("run directory %s: taking over the lock left by %s", self.path.parent, _describe(left))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now()}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
        self._handle = handle

    def release(self) -> None:
        import fcntl

        if self._handle is None:
            return
        self._handle.truncate(0)  # an empty lock file: released cleanly
        self._handle.flush()
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None


def lock_held(path: Path) -> bool:
    """Whether some process holds the lock at `path` (a probe: takes nothing, writes nothing)."""
    import fcntl

    if not path.is_file():
        return False
    with path.open("a", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False


def _holder(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):  # being written this instant, or cut: the holder is unknown
        return None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"
