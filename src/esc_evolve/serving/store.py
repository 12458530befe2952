"""`SeekerStore`: what chat and serving keep about each seeker, in one local SQLite file.

Two tables: `turns` (the conversation: one row per message, numbered from 0 within the seeker's conversation)
and `profiles` (each profile inferred by reflection, with the turn it came from). Nothing leaves the machine.

Deleting is meant: `forget` removes the seeker's rows, and the database runs with `secure_delete` on, so the
freed pages are overwritten with zeros instead of keeping the text until SQLite reuses them; it keeps the default
rollback journal (no write-ahead log that would hold old copies of pages). The file is created readable by its
owner only. With `enabled=False` nothing is written, not even the file, and every read is empty.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from esc_evolve.provenance import now

Role = Literal["user", "assistant"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    seeker TEXT NOT NULL,
    turn INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    text TEXT NOT NULL,
    meta TEXT,
    time TEXT NOT NULL,
    PRIMARY KEY (seeker, turn)
);
CREATE TABLE IF NOT EXISTS profiles (
    id INTEGER PRIMARY KEY,
    seeker TEXT NOT NULL,
    turn INTEGER NOT NULL,
    time TEXT NOT NULL,
    profile TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS profiles_by_seeker ON profiles (seeker, id);
"""


def default_db_path() -> Path:
    """`$XDG_DATA_HOME/esc-evolve/seekers.db`, or `~/.local/share/esc-evolve/seekers.db`."""
    root = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(root).expanduser() / "esc-evolve" / "seekers.db"


class SeekerStore:
    """Conversations and inferred profiles per seeker id. Safe to share between threads: every call opens its
    own connection, and writes are serialised by a lock (and by SQLite's own locking across processes)."""

    def __init__(self, path: str | Path | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(path).expanduser() if path is not None else default_db_path()
        self._lock = threading.Lock()
        self._ready = False

    # ------------------------------------------------------------------------------------------------------
    # Conversation

    def add_turn(self, seeker: str, role: Role, text: str, meta: dict[str, Any] | None = None) -> int:
        """Append one message; returns its turn number (0, 1, ...) in the seeker's conversation (-1 when the
        store is disabled: nothing is kept)."""
        if role not in ("user", "assistant"):
            raise ValueError(f"role must be 'user' or 'assistant', got {role!r}")
        if not self.enabled:
            return -1
        with self._write() as db:
            (turn,) = db.execute("SELECT COALESCE(MAX(turn) + 1, 0) FROM turns WHERE seeker = ?", (seeker,)).fetchone()
            db.execute(
                "INSERT INTO turns (seeker, turn, role, text, meta, time) VALUES (?, ?, ?, ?, ?, ?)",
                (seeker, turn, role, text, _dump(meta), now()),
            )
        return int(turn)

    def conversation(self, seeker: str) -> list[dict[str, Any]]:
        """The stored messages, oldest first: `{"turn", "role", "text", "meta", "time"}`."""
        rows = self._read("SELECT turn, role, text, meta, time FROM turns WHERE seeker = ? ORDER BY turn", (seeker,))
        return [{"turn": t, "role": r, "text": x, "meta": _load(m), "time": w} for t, r, x, m, w in rows]

    def seeker_turns(self, seeker: str) -> int:
        """How many of the seeker's own messages (user turns) are stored."""
        rows = self._read("SELECT COUNT(*) FROM turns WHERE seeker = ? AND role = 'user'", (seeker,))
        return int(rows[0][0]) if rows else 0

    def reset_conversation(self, seeker: str) -> None:
        """Delete the conversation, keep the profiles (chat's /reset: start over, still known)."""
        if self.enabled and self.path.exists():
            with self._write() as db:
                db.execute("DELETE FROM turns WHERE seeker = ?", (seeker,))

    # ------------------------------------------------------------------------------------------------------
    # Profiles

    def save_profile(self, seeker: str, profile: dict[str, Any], turn: int) -> None:
        """Keep an inferred profile (the fields reflection parsed) with the turn it was inferred at."""
        if not self.enabled:
            return
        with self._write() as db:
            db.execute(
                "INSERT INTO profiles (seeker, turn, time, profile) VALUES (?, ?, ?, ?)",
                (seeker, int(turn), now(), _dump(profile)),
            )

    def profile(self, seeker: str) -> dict[str, Any] | None:
        """The newest profile, `{"turn", "time", **fields}`, or None."""
        rows = self._profiles(seeker, newest_only=True)
        return rows[0] if rows else None

    # ------------------------------------------------------------------------------------------------------
    # What a seeker can ask for: everything, or nothing kept

    def export(self, seeker: str) -> dict[str, Any]:
        """Everything stored about the seeker: `{"seeker", "conversation": [...], "profiles": [...]}`."""
        return {"seeker": seeker, "conversation": self.conversation(seeker), "profiles": self._profiles(seeker)}

    def forget(self, seeker: str) -> bool:
        """Delete the seeker's conversation and profiles (overwritten on disk, see the module docstring);
        True if anything was stored."""
        if not self.enabled or not self.path.exists():
            return False
        with self._write() as db:
            removed = db.execute("DELETE FROM turns WHERE seeker = ?", (seeker,)).rowcount
            removed += db.execute("DELETE FROM profiles WHERE seeker = ?", (seeker,)).rowcount
        return removed > 0

    def seekers(self) -> list[str]:
        """Every seeker id with something stored."""
        rows = self._read("SELECT seeker FROM turns UNION SELECT seeker FROM profiles ORDER BY 1", ())
        return [r[0] for r in rows]

    # ------------------------------------------------------------------------------------------------------

    def _profiles(self, seeker: str, newest_only: bool = False) -> list[dict[str, Any]]:
        order = "DESC LIMIT 1" if newest_only else "ASC"
        query = f"SELECT turn, time, profile FROM profiles WHERE seeker = ? ORDER BY id {order}"
        return [{"turn": t, "time": w, **(_load(p) or {})} for t, w, p in self._read(query, (seeker,))]

    def _read(self, query: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if not self.enabled or not self.path.exists():
            return []
        with self._connect() as db:
            return db.execute(query, args).fetchall()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A connection in one transaction (committed on success, rolled back on error), under the lock."""
        with self._lock:
            self._create()
            with self._connect() as db:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.rollback()
                    raise
                db.commit()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA secure_delete = ON")
            yield db
        finally:
            db.close()

    def _create(self) -> None:
        """The folder (owner only) and the file (owner read/write only), then the schema. Called under the lock."""
        if self._ready and self.path.exists():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        with self._connect() as db:
            db.executescript(_SCHEMA)
        self._ready = True


def _dump(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _load(value: str | None) -> Any:
    return None if value is None else json.loads(value)
