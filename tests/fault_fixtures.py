"""Faults for the reliability tests: a disk that fills up, a process that holds a run directory's lock, and a
pipeline process killed with SIGKILL at chosen moments and resumed until it finishes."""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


class _FullDiskFile:
    """A file opened for writing on a disk with `disk.room` bytes left: a write that does not fit writes what
    fits (as the OS does) and then fails with ENOSPC."""

    def __init__(self, handle: Any, disk: FullDisk) -> None:
        self._handle = handle
        self._disk = disk

    def write(self, data: Any) -> int:
        if len(data) <= self._disk.room:
            self._disk.room -= len(data)
            return self._handle.write(data)
        self._handle.write(data[: self._disk.room])
        self._handle.flush()
        self._disk.room = 0
        self._disk.failures += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> _FullDiskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


class FullDisk:
    """Files opened for writing under `folder` (through `open` or `Path.open`) share `room` bytes."""

    def __init__(self, folder: Path, room: int) -> None:
        self.folder = folder.resolve()
        self.room = room
        self.failures = 0

    def covers(self, file: Any, mode: str) -> bool:
        if not isinstance(file, (str, os.PathLike)) or not set(mode) & set("wax+"):
            return False
        return Path(file).resolve().is_relative_to(self.folder)


@contextmanager
def disk_full(monkeypatch: pytest.MonkeyPatch, folder: Path, room: int = 0) -> Iterator[FullDisk]:
    """Python-level writes under `folder` fail with ENOSPC after `room` more bytes (writers in C or Rust, such
    as safetensors, are not covered)."""
    real_open = builtins.open
    disk = FullDisk(folder, room)

    def limited_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        return _FullDiskFile(handle, disk) if disk.covers(file, mode) else handle

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", limited_open)
        patch.setattr(io, "open", limited_open)  # what pathlib.Path.open calls
        yield disk


HOLDER = """
import sys, time
from pathlib import Path
from esc_evolve.pipeline import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


@contextmanager
def lock_holder(lock_file: Path) -> Iterator[subprocess.Popen]:
    """Another process that takes the run lock at `lock_file` and keeps it until it is killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        if process.stdout.readline().strip() != "locked":
            process.kill()
            raise AssertionError(f"the lock holder did not start: {process.stderr.read()}")
        yield process
    finally:
        process.kill()
        process.wait(timeout=30)


# ---------------------------------------------------------------------------------------------------------
# SIGKILL at chosen moments


@dataclass
class Kill:
    """A SIGKILL `delay` seconds after `stage` started, or after a file matching `after` (a glob in the run
    directory, e.g. a checkpoint) exists once it started; `landed_in` is the stage the process was in when it
    died (read from its log afterwards; None: between stages)."""

    stage: str
    delay: float
    after: str | None = None
    landed_in: str | None = None


_STAGE_LINE = re.compile(r"stage (\S+): (started|finished)")


def running_stage(log: str) -> str | None:
    """The stage that `log` (run.log lines of one process) shows started and not finished."""
    current = None
    for name, event in _STAGE_LINE.findall(log):
        current = name if event == "started" else None
    return current


class KilledRun:
    """A pipeline run started as a subprocess (`command`, which must resume), killed and restarted."""

    def __init__(self, run_dir: Path, command: Sequence[str], env: dict[str, str], cwd: Path) -> None:
        self.run_dir = run_dir
        self.command, self.env, self.cwd = list(command), env, cwd
        self.output = run_dir.parent / "processes.log"  # what the processes printed, for failure messages
        self.kills: list[Kill] = []

    @property
    def log(self) -> Path:
        return self.run_dir / "logs" / "run.log"

    def kill_in(self, kill: Kill, timeout: float = 300) -> None:
        """Start the run, wait for `kill.stage` to start, wait `kill.delay` seconds, SIGKILL it."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        process = self._start()
        deadline = time.monotonic() + timeout
        self._wait(process, lambda: f"stage {kill.stage}: started" in self._since(offset), kill.stage, deadline)
        if kill.after:
            self._wait(process, lambda: any(self.run_dir.glob(kill.after)), kill.after, deadline)
        time.sleep(kill.delay)
        alive = process.poll() is None
        process.kill()  # SIGKILL: no finally block, no flush, no lock release
        process.wait(timeout=60)
        kill.landed_in = running_stage(self._since(offset)) if alive else None
        self.kills.append(kill)

    def finish(self, timeout: float = 600) -> None:
        """Resume once more and let it run to the end."""
        process = self._start()
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        assert code == 0, self._tail()

    def _wait(self, process: subprocess.Popen, ready: Callable[[], bool], what: str, deadline: float) -> None:
        while not ready():
            if process.poll() is not None:
                raise AssertionError(f"the run ended before {what}:\n{self._tail()}")
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"no {what} in time:\n{self._tail()}")
            time.sleep(0.01)

    def _start(self) -> subprocess.Popen:
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        with self.output.open("a") as out:
            out.write(f"--- start ({len(self.kills)} kills so far)\n")
            out.flush()
            return subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def _since(self, offset: int) -> str:
        if not self.log.exists():
            return ""
        with self.log.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode("utf-8", errors="replace")

    def _tail(self) -> str:
        return self.output.read_text(errors="replace")[-4000:]


def torn_lines(run_dir: Path) -> list[str]:
    """JSON-lines files of the run with a line that is cut or is not JSON."""
    import json

    bad = []
    for file in sorted(run_dir.rglob("*.jsonl")):
        text = file.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            bad.append(f"{file}: last line has no newline")
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                json.loads(line)
            except ValueError:
                bad.append(f"{file}:{number}")
    return bad
