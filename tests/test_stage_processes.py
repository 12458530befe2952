"""`esc-evolve run` as an orchestrator (`run.stage_processes`): each stage in its own process, training under
`accelerate launch` on several GPUs, the run directory and stages.json kept by the orchestrator alone.

On this CPU: the command each stage gets (1 and 8 devices, with and without an accelerate file, checked with
accelerate's own parser), when stages leave the process, the errors of a failing child, and the tiny pipeline
with every stage in a child, one of them killed midway, resumed to the results of the in-process run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esc_evolve.cli.app import app
from esc_evolve.config import ExperimentConfig, load_config
from esc_evolve.errors import ConfigError, StageFailedError
from esc_evolve.pipeline import RunDir, RunLock, processes, run_pipeline
from esc_evolve.pipeline.rundir import lock_held
from tests.pipeline_fixtures import (
    CONFIG,
    assert_same_results,
    register_scripted_backend,
    results_of,
    run_env,
    tiny_run_overrides,
)

RUN = Path("/runs/paper")
PY = sys.executable
CHILD = ["-m", "esc_evolve.cli.app", "stage", str(RUN)]


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------------
# The command of each stage


def test_one_device_every_stage_is_one_plain_process() -> None:
    for name, training in [("prepare", False), ("sft", True), ("iter1.pairs", False), ("iter1.dpo", True)]:
        argv = processes.stage_argv(name, RUN, training=training, devices=1, accelerate_config=Path("/a.yaml"))
        assert argv == [PY, *CHILD, name]
    assert processes.stage_argv("sft", RUN, training=True, devices=0) == [PY, *CHILD, "sft"]


def test_eight_devices_training_stages_run_under_accelerate_one_process_per_device() -> None:
    from accelerate.commands.launch import launch_command_parser

    with_file = processes.stage_argv("iter1.dpo", RUN, training=True, devices=8, accelerate_config=Path("/z3.yaml"))
    plain = processes.stage_argv("sft", RUN, training=True, devices=8)
    assert with_file[:3] == plain[:3] == [PY, "-m", "accelerate.commands.launch"]
    parsed = launch_command_parser().parse_args(with_file[3:])
    assert (parsed.config_file, parsed.num_processes, parsed.multi_gpu) == ("/z3.yaml", 8, False)
    assert parsed.module and parsed.training_script == "esc_evolve.cli.app"
    assert parsed.training_script_args == ["stage", str(RUN), "iter1.dpo"]
    parsed = launch_command_parser().parse_args(plain[3:])  # no file: DDP, precision left to our config
    assert (parsed.config_file, parsed.num_processes, parsed.multi_gpu) == (None, 8, True)
    assert (parsed.num_machines, parsed.mixed_precision) == (1, "no")
    assert parsed.training_script_args == ["stage", str(RUN), "sft"]
    # Generation stages build their own engine in one process, whatever the device count.
    assert processes.stage_argv("iter1.pairs", RUN, training=False, devices=8) == [PY, *CHILD, "iter1.pairs"]


def test_which_stages_train() -> None:
    config = ExperimentConfig()
    assert [n for n in ("prepare", "sft", "iter1.pairs", "iter1.dpo", "iter2.sft", "eval", "eval.simulate")
            if processes.trains(config, n)] == ["sft", "iter1.dpo", "iter2.sft"]  # fmt: skip
    assert not processes.trains(ExperimentConfig.model_validate({"run": {"m0_from": "runs/x"}}), "sft")  # a copy


def test_the_accelerate_file_is_checked_before_any_stage(tmp_path: Path) -> None:
    config = ExperimentConfig.model_validate({"run": {"accelerate_config": str(tmp_path / "missing.yaml")}})
    with pytest.raises(ConfigError, match="run.accelerate_config: .*missing.yaml is not a file"):
        processes.accelerate_file(config)
    (tmp_path / "ddp.yaml").write_text("num_processes: 8\n")
    config.run.accelerate_config = str(tmp_path / "ddp.yaml")
    assert processes.accelerate_file(config) == (tmp_path / "ddp.yaml").resolve()


# ---------------------------------------------------------------------------------------------------------
# When stages leave the process


def test_stages_leave_the_process_on_cuda_or_vllm_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def config(**run: str) -> ExperimentConfig:
        return ExperimentConfig.model_validate({"run": run, "model": {"device": "auto"}})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not processes.stage_processes(config())  # a CPU machine: in-process, as before
    assert processes.stage_processes(config(stage_processes="always"))
    vllm = ExperimentConfig.model_validate({"generation": {"backend": "vllm"}})
    assert processes.stage_processes(vllm) and not processes.stage_processes(
        vllm.model_copy(update={"run": config(stage_processes="never").run})
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert processes.stage_processes(config()) and processes.cuda_devices(config()) == 8
    on_cpu = ExperimentConfig.model_validate({"model": {"device": "cpu"}})
    assert processes.cuda_devices(on_cpu) == 0 and not processes.stage_processes(on_cpu)


def test_run_under_a_launcher_is_refused_before_it_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "8")
    config = ExperimentConfig.model_validate({"run": {"output_dir": str(tmp_path), "name": "ranked"}})
    with pytest.raises(ConfigError, match="start it as one process, not under accelerate launch"):
        run_pipeline(config)
    assert not (tmp_path / "ranked").exists()


# ---------------------------------------------------------------------------------------------------------
# A child that fails, and the child's own checks


def _run_dir(tmp_path: Path) -> RunDir:
    return RunDir.create(ExperimentConfig.model_validate({"run": {"output_dir": str(tmp_path), "name": "r"}}))


def _child_runs(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    monkeypatch.setattr(processes, "stage_argv", lambda *args, **kwargs: [PY, "-c", code])


def test_a_failing_child_is_an_error_with_its_exit_status_and_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run_dir(tmp_path)
    _child_runs(monkeypatch, "import sys; print('step 3 of 9', flush=True); sys.exit('CUDA out of memory')")
    with pytest.raises(StageFailedError) as failed:
        processes.run_in_child(run, "iter1.dpo")
    message = str(failed.value)
    assert "stage iter1.dpo failed with exit status 1" in message and "rerun with --resume" in message
    assert message.endswith("step 3 of 9\nCUDA out of memory")  # the end of its output
    assert str(run.layout.stage_log_file("iter1.dpo")) in message
    _child_runs(monkeypatch, "print('done?')")  # exit 0, no summary: not recorded as finished either
    with pytest.raises(StageFailedError, match="ended without writing its summary"):
        processes.run_in_child(run, "iter1.dpo")
    # A summary left by an earlier attempt is not taken for this one's.
    run.layout.stage_summary_file("iter1.dpo").write_text('{"steps": 2}')
    with pytest.raises(StageFailedError, match="ended without writing its summary"):
        processes.run_in_child(run, "iter1.dpo")
    log = run.layout.stage_log_file("iter1.dpo").read_text()
    assert log.count("=== ") == 3 and "done?" in log  # every attempt, appended


def test_the_stage_command_runs_only_for_an_orchestrator(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    result = CliRunner().invoke(app, ["stage", str(run.path), "prepare"])
    assert result.exit_code == 2 and "nothing holds it now" in _one_line(result.output)
    with RunLock(run.layout.lock_file):
        assert lock_held(run.layout.lock_file)
        result = CliRunner().invoke(app, ["stage", str(run.path), "iter9.dpo"])
    assert result.exit_code == 2 and "has no stage 'iter9.dpo'" in _one_line(result.output)
    assert not lock_held(run.layout.lock_file) and not run.layout.stages_file.exists()


# ---------------------------------------------------------------------------------------------------------
# The tiny pipeline with every stage in its own process

# Runs a stage's real command and SIGKILLs it once its first chunk of pairs is written (or when it ends), then
# itself: a child killed midway, as a preempted job is.
KILL_MIDWAY = """
import os, signal, subprocess, sys, time
pairs, argv = sys.argv[1], sys.argv[2:]
child = subprocess.Popen(argv)
while child.poll() is None and not (os.path.exists(pairs) and os.path.getsize(pairs) > 0):
    time.sleep(0.02)
child.kill()
child.wait()
print("test: stage killed", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_stage_processes_resume_after_a_killed_child_to_the_in_process_results(
    reference_run: Path, varied_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in run_env(hash_seed=3).items():  # the reference run's numerics: one torch thread, offline
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(processes, "ENTRY_MODULE", "tests.pipeline_fixtures")  # children with the scripted backend
    register_scripted_backend()
    overrides = [*tiny_run_overrides(tmp_path, varied_model_dir, iterations=1), "run.stage_processes=always"]
    config = load_config(CONFIG, overrides)
    run_dir = tmp_path / "quickstart"
    real_argv = processes.stage_argv
    killed: list[str] = []

    def kill_pairs_once(name: str, *args, **kwargs) -> list[str]:
        argv = real_argv(name, *args, **kwargs)
        if name != "iter1.pairs" or killed:
            return argv
        killed.append(name)
        return [PY, "-c", KILL_MIDWAY, str(run_dir / "iter1" / "pairs.jsonl"), *argv]

    monkeypatch.setattr(processes, "stage_argv", kill_pairs_once)
    with pytest.raises(StageFailedError) as failed:
        run_pipeline(config, resume=True)
    message = str(failed.value)
    assert "stage iter1.pairs was killed by signal SIGKILL" in message and "test: stage killed" in message
    assert list(json.loads((run_dir / "stages.json").read_text())) == ["prepare", "sft"]
    assert 0 < len((run_dir / "iter1" / "pairs.jsonl").read_text().splitlines()) < 4  # a chunk of 2 of 4 written
    assert not lock_held(run_dir / ".lock")  # the orchestrator let go: --resume can start

    run_pipeline(config, resume=True)
    stages = json.loads((run_dir / "stages.json").read_text())
    assert list(stages) == ["prepare", "sft", "iter1.pairs", "iter1.dpo", "eval"]
    assert sorted(p.stem for p in (run_dir / "logs" / "stages").glob("*.json")) == sorted(stages)
    assert_same_results(results_of(run_dir), results_of(reference_run))
