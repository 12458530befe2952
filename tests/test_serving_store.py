"""SeekerStore: conversations and profiles per seeker in SQLite; forgetting deletes; disabled writes nothing."""

from __future__ import annotations

import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from esc_evolve.serving import SeekerStore, default_db_path

SECRET = "my landlord keeps the spare key of flat 7B"  # text that must leave no trace once forgotten


def _raw_bytes(db: Path) -> bytes:
    """Every byte SQLite keeps for this database (the file and any journal next to it)."""
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def _rows(db: Path, seeker: str) -> int:
    with sqlite3.connect(db) as conn:
        turns = conn.execute("SELECT COUNT(*) FROM turns WHERE seeker = ?", (seeker,)).fetchone()[0]
        profiles = conn.execute("SELECT COUNT(*) FROM profiles WHERE seeker = ?", (seeker,)).fetchone()[0]
    return turns + profiles


def test_turns_are_numbered_per_seeker_and_read_back(tmp_path: Path) -> None:
    store = SeekerStore(tmp_path / "seekers.db")
    assert store.add_turn("ana", "user", "hello", {"assessment": {"level": "none"}}) == 0
    assert store.add_turn("ana", "assistant", "hi, how are you?") == 1
    assert store.add_turn("ben", "user", "hey") == 0
    assert store.add_turn("ana", "user", "not great") == 2
    conversation = store.conversation("ana")
    assert [(t["turn"], t["role"], t["text"]) for t in conversation] == [
        (0, "user", "hello"),
        (1, "assistant", "hi, how are you?"),
        (2, "user", "not great"),
    ]
    assert conversation[0]["meta"] == {"assessment": {"level": "none"}} and conversation[1]["meta"] is None
    assert conversation[0]["time"]
    assert store.seeker_turns("ana") == 2 and store.seeker_turns("ben") == 1 and store.seeker_turns("cy") == 0
    assert store.seekers() == ["ana", "ben"]
    with pytest.raises(ValueError, match="role"):
        store.add_turn("ana", "system", "x")  # type: ignore[arg-type]


def test_the_newest_profile_is_returned_and_export_holds_everything(tmp_path: Path) -> None:
    store = SeekerStore(tmp_path / "seekers.db")
    assert store.profile("ana") is None
    store.add_turn("ana", "user", "hello")
    store.save_profile("ana", {"emotion": "anxiety"}, turn=0)
    store.save_profile("ana", {"emotion": "sadness", "need": "to be heard"}, turn=4)
    newest = store.profile("ana")
    assert newest["turn"] == 4 and newest["emotion"] == "sadness" and newest["need"] == "to be heard"
    exported = store.export("ana")
    assert exported["seeker"] == "ana"
    assert [p["emotion"] for p in exported["profiles"]] == ["anxiety", "sadness"]
    assert [t["text"] for t in exported["conversation"]] == ["hello"]


def test_forget_deletes_the_rows_and_leaves_no_trace_in_the_file(tmp_path: Path) -> None:
    db = tmp_path / "seekers.db"
    store = SeekerStore(db)
    store.add_turn("ana", "user", SECRET)
    store.add_turn("ana", "assistant", "That sounds worrying.")
    store.save_profile("ana", {"situation": SECRET}, turn=1)
    store.add_turn("ben", "user", "I am fine, thanks")
    assert SECRET.encode() in _raw_bytes(db)

    assert store.forget("ana") is True
    assert _rows(db, "ana") == 0 and _rows(db, "ben") == 1
    assert store.export("ana") == {"seeker": "ana", "conversation": [], "profiles": []}
    assert SECRET.encode() not in _raw_bytes(db)  # overwritten (secure_delete), not just unlinked from the tree
    assert store.forget("ana") is False  # nothing left to delete
    assert [t["text"] for t in store.conversation("ben")] == ["I am fine, thanks"]


def test_reset_conversation_keeps_the_profile(tmp_path: Path) -> None:
    store = SeekerStore(tmp_path / "seekers.db")
    store.add_turn("ana", "user", "hello")
    store.save_profile("ana", {"emotion": "anxiety"}, turn=0)
    store.reset_conversation("ana")
    assert store.conversation("ana") == [] and store.profile("ana")["emotion"] == "anxiety"
    assert store.add_turn("ana", "user", "again") == 0


def test_a_disabled_store_writes_nothing_and_reads_empty(tmp_path: Path) -> None:
    db = tmp_path / "private" / "seekers.db"
    store = SeekerStore(db, enabled=False)
    assert store.add_turn("ana", "user", SECRET) == -1
    store.save_profile("ana", {"emotion": "anxiety"}, turn=0)
    store.reset_conversation("ana")
    assert store.conversation("ana") == [] and store.profile("ana") is None and store.seeker_turns("ana") == 0
    assert store.export("ana") == {"seeker": "ana", "conversation": [], "profiles": []}
    assert store.forget("ana") is False
    assert not db.parent.exists()


def test_reads_before_any_write_create_nothing(tmp_path: Path) -> None:
    db = tmp_path / "seekers.db"
    store = SeekerStore(db)
    assert store.conversation("ana") == [] and store.profile("ana") is None and store.forget("ana") is False
    assert not db.exists()


def test_the_database_is_private_to_its_owner(tmp_path: Path) -> None:
    db = tmp_path / "data" / "seekers.db"
    SeekerStore(db).add_turn("ana", "user", "hello")
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.parent.stat().st_mode) & 0o077 == 0


def test_default_path_is_under_the_users_data_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_db_path() == tmp_path / "xdg" / "esc-evolve" / "seekers.db"
    assert SeekerStore(None).path == default_db_path()
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_db_path() == tmp_path / ".local" / "share" / "esc-evolve" / "seekers.db"


def test_concurrent_writers_get_distinct_turn_numbers(tmp_path: Path) -> None:
    store = SeekerStore(tmp_path / "seekers.db")
    numbers: list[int] = []
    lock = threading.Lock()

    def write(i: int) -> None:
        for j in range(5):
            n = store.add_turn("ana", "user", f"message {i}.{j}")
            with lock:
                numbers.append(n)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(numbers) == list(range(30))
    assert [t["turn"] for t in store.conversation("ana")] == list(range(30))
