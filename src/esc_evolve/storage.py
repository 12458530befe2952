"""Writing results so that nothing half-written is ever read: atomic files and folders published by renaming.

Every artifact of a run goes through here: text, JSON and array files (`write_atomic`, `write_json_atomic`,
`atomic_path`) and model folders (`staging_folder` + `publish_folder`). A kill at any moment leaves either the
previous version or the new one, never a mix; a folder still being written sits under a hidden `.NAME.staging`
name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to (e.g. with `np.save`); renamed onto `path` when the block
    ends without an error, removed when it raises. Its suffix is `path`'s, for writers that check it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results should read like any other file
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        exc.filename = exc.filename or str(path)  # a failed write() names no file (e.g. a full disk): say which
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file (text is written as UTF-8)."""
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        handle.write(text.encode("utf-8") if isinstance(text, str) else text)
        handle.flush()
        os.fsync(handle.fileno())


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> Any | None:
    """The file's JSON, or None when it is missing or unreadable (e.g. cut by a kill before this module)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def staging_folder(target: Path, *, clear: bool = True) -> Path:
    """The hidden folder beside `target` where its next version is written (emptied first unless `clear` is
    False: several processes of one job may share it)."""
    staging = target.with_name(f".{target.name}.staging")
    if clear:
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted write
    return staging


def publish_folder(staging: Path, target: Path) -> None:
    """Rename a finished folder into place; an older `target` is moved aside first and then deleted."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
