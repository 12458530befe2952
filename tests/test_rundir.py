"""A run directory under faults: one writer at a time, a full disk, torn and corrupt lines, repairs that are atomic."""

from __future__ import annotations

import functools
import importlib
import json
import logging
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esc_evolve.cli.app import app
from esc_evolve.config import ExperimentConfig
from esc_evolve.errors import DataFormatError, DiskFullError, RunBusyError
from esc_evolve.evolve.pairs import PairStore
from esc_evolve.pipeline import RunDir, RunLayout, RunLock, run_pipeline
from tests.fault_fixtures import disk_full, lock_holder
from tests.test_evolve_loop import NoRiskDetector, ScriptedGenerator

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The module (the package exports its function `stages` under the same name).
stages_module = importlib.import_module("esc_evolve.pipeline.stages")


def _one_line(text: str) -> str:
    """CLI output without the console's line wrapping."""
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------------
# One writer per run directory


def test_a_second_writer_is_refused_with_the_holders_pid_and_host(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "busy")
    with lock_holder(layout.lock_file) as holder:
        expected = f"pid {holder.pid} on host {socket.gethostname()}"
        with pytest.raises(RunBusyError, match=expected):
            RunLock(layout.lock_file).acquire()
        # The commands that write a run say the same and start nothing (the backbone named does not even exist).
        config = ["--set", f"run.output_dir={tmp_path}", "--set", "run.name=busy", "--set", "model.name=/no/such"]
        for command in ("run", "sft"):
            result = CliRunner().invoke(app, [command, str(CONFIGS / "quickstart.yaml"), "--resume", *config])
            assert result.exit_code == 2, (command, result.output)
            assert f"is being written by {expected}" in _one_line(result.output), command
        assert not layout.config_file.exists()
        RunDir.create(ExperimentConfig.model_validate({"run": {"output_dir": str(tmp_path), "name": "busy"}}))
        result = CliRunner().invoke(app, ["eval", str(layout.root)])
        assert result.exit_code == 2 and f"is being written by {expected}" in _one_line(result.output)


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lock_file = RunLayout(tmp_path).lock_file
    with lock_holder(lock_file) as holder:
        holder.kill()  # SIGKILL: no chance to release
        holder.wait(timeout=30)
    assert json.loads(lock_file.read_text())["pid"] == holder.pid  # the file still names the dead holder
    with caplog.at_level(logging.WARNING), RunLock(lock_file):
        assert json.loads(lock_file.read_text())["host"] == socket.gethostname()
    assert f"taking over the lock left by pid {holder.pid} on host {socket.gethostname()}" in caplog.text
    assert lock_file.read_text() == ""  # released: emptied, so the next writer has nothing to take over
    caplog.clear()
    with caplog.at_level(logging.WARNING), RunLock(lock_file):
        pass
    assert "taking over" not in caplog.text


# ---------------------------------------------------------------------------------------------------------
# pairs.jsonl: torn and corrupt lines


def _records(n: int, tmp_path: Path):
    """`n` pair records as the evolve loop writes them (scripted generator, every seeker read as safe)."""
    from tests.test_evolve_loop import _config, generate_pairs

    store = PairStore(tmp_path / "made" / "pairs.jsonl")
    generate_pairs(_config(tmp_path, contexts=n), 1, ScriptedGenerator(), None, store, detector=NoRiskDetector())
    return list(store.read())


def test_repairing_a_torn_line_on_a_full_disk_loses_no_finished_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = _records(4, tmp_path)
    store = PairStore(tmp_path / "iter1" / "pairs.jsonl")
    store.append(records[:3])
    with store.path.open("a", encoding="utf-8") as handle:
        handle.write(records[3].model_dump_json()[:50])  # the line a kill cut
    with disk_full(monkeypatch, store.path.parent) as disk, pytest.raises(OSError, match="No space left") as caught:
        store.append(records[3:])
    assert [r.sample_id for r in store.read()] == [r.sample_id for r in records[:3]]  # the repair was atomic
    assert disk.failures == 1 and caught.value.filename == str(store.path)
    store.append(records[3:])  # space again
    assert store.path.read_text().count("\n") == 4 and list(store.read()) == records


def test_a_line_cut_inside_a_character_is_not_a_finished_sample(tmp_path: Path) -> None:
    records = _records(2, tmp_path)
    store = PairStore(tmp_path / "pairs.jsonl")
    store.append(records[:1])
    torn = records[1].model_copy(update={"chosen": "Ça va? Tu n’es pas seul."}).model_dump_json().encode()
    cut = torn.index("’".encode()) + 1  # inside the 3-byte apostrophe
    with store.path.open("ab") as handle:
        handle.write(torn[:cut])
    assert [r.sample_id for r in store.read()] == [records[0].sample_id]
    store.append(records[1:])
    assert list(store.read()) == records


def test_a_corrupt_pair_line_is_reported_by_file_and_line(tmp_path: Path) -> None:
    records = _records(2, tmp_path)
    store = PairStore(tmp_path / "pairs.jsonl")
    store.append(records[:1])
    with store.path.open("a", encoding="utf-8") as handle:
        handle.write('{"sample_id": "x", "keep": tru}\n')  # whole, but not a record: not a kill's doing
    store.append(records[1:])
    with pytest.raises(DataFormatError, match=rf"{store.path}:2: not a pair record .*delete that line"):
        store.done_ids()


# ---------------------------------------------------------------------------------------------------------
# A full disk stops the run with a message; the run resumes from what was complete


def _pairs_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ExperimentConfig:
    """A run of the pairs stage alone, answered by the scripted generator, 6 contexts in chunks of 2."""
    monkeypatch.setattr("esc_evolve.generation.build_generator", lambda *a, **k: ScriptedGenerator())
    monkeypatch.setattr("esc_evolve.evolve.loop.default_detector", NoRiskDetector)
    plan = [("iter1.pairs", functools.partial(stages_module.pairs, iteration=1))]
    monkeypatch.setattr(stages_module, "stages", lambda config: plan)
    return ExperimentConfig.model_validate(
        {
            "run": {"output_dir": str(tmp_path), "name": "full"},
            "evolve": {"contexts_per_iteration": 6},
            "generation": {"batch_size": 2},
        }
    )


def test_a_full_disk_during_a_pairs_append_stops_the_run_and_resume_completes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _pairs_run(tmp_path, monkeypatch)
    layout = RunLayout.of(config.run)
    sizes = [len(r.model_dump_json()) + 1 for r in _records(6, tmp_path / "sizes")]
    room = sizes[0] + sizes[1] + sizes[2] // 2  # the first chunk fits; the second is cut inside its first line
    with disk_full(monkeypatch, layout.iteration_dir(1), room), pytest.raises(DiskFullError) as stopped:
        run_pipeline(config)
    message = str(stopped.value)
    assert message.startswith("stage iter1.pairs: no space left on the device writing ")
    assert str(layout.pairs_file(1)) in message and "rerun with --resume" in message
    before = list(PairStore(layout.pairs_file(1)).read())
    assert len(before) == 2 and not layout.pairs_file(1).read_bytes().endswith(b"\n")  # 2 finished, 1 torn
    assert "iter1.pairs" not in json.loads(layout.stages_file.read_text() if layout.stages_file.exists() else "{}")

    run_pipeline(config, resume=True)
    after = list(PairStore(layout.pairs_file(1)).read())
    assert after[:2] == before and len({r.sample_id for r in after}) == len(after) == 6
    lines = layout.pairs_file(1).read_text().splitlines(keepends=True)
    assert len(lines) == 6 and all(line.endswith("}\n") for line in lines)
    assert json.loads(layout.stages_file.read_text())["iter1.pairs"]["contexts"] == 6


def test_a_full_disk_while_dpo_publishes_stops_the_run_and_resume_publishes_a_clean_m1(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from esc_evolve.models.lineage import adapter_chain
    from tests.test_dpo import _config, _m0, _write_pairs

    config = _config(tmp_path, tiny_model_dir, max_steps=2)
    layout = RunLayout.of(config.run)
    RunDir.create(config)
    m0 = _m0(layout.root, tiny_model_dir)
    _write_pairs(layout.root)
    plan = [("iter1.dpo", functools.partial(stages_module.dpo, iteration=1))]
    monkeypatch.setattr(stages_module, "stages", lambda config: plan)
    staging = layout.iteration_dir(1) / ".m1.staging"
    with disk_full(monkeypatch, staging), pytest.raises(DiskFullError, match=r"^stage iter1\.dpo: no space left"):
        run_pipeline(config, resume=True)
    assert staging.is_dir() and not layout.model_dir(1).exists()  # the half-saved adapter was not published

    (staging / "left-by-the-failed-save.txt").write_text("stale")
    run_pipeline(config, resume=True)
    m1 = layout.model_dir(1)
    assert not staging.exists() and not (m1 / "left-by-the-failed-save.txt").exists()
    assert json.loads((m1 / "train_summary.json").read_text())["steps"] == 2
    assert adapter_chain(m1) == (str(tiny_model_dir), [m0.resolve(), m1.resolve()])
