"""Each stage of a run in its own process (`run.stage_processes`), with `esc-evolve run` as the orchestrator.

On GPUs one process cannot run every stage: training leaves CUDA memory taken that vLLM's start-up check then
finds missing, and a process that sees 8 GPUs trains under `nn.DataParallel`. So the orchestrator holds the run's
lock and its bookkeeping (stages.json) and starts one child per stage, `esc-evolve stage RUN NAME` (hidden): a
generation stage as one process that builds its own engine, a training stage under `accelerate launch` with one
process per visible GPU when there is more than one. The child runs the stage function the in-process pipeline
runs, with the same seed, and hands its summary back in `RUN/logs/stages/NAME.json`; it never writes stages.json
and never takes the lock (it checks that the orchestrator holds it). Its output goes to `RUN/logs/stages/NAME.log`
and to the orchestrator's terminal.
"""

from __future__ import annotations

import codecs
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from esc_evolve.config import ExperimentConfig
from esc_evolve.errors import ConfigError, StageFailedError
from esc_evolve.logging_setup import setup_logging
from esc_evolve.pipeline.layout import RunLayout
from esc_evolve.pipeline.rundir import RunDir, lock_held, read_run_config
from esc_evolve.storage import read_json, write_json_atomic

log = logging.getLogger(__name__)

# The module a child runs as `python -m ENTRY_MODULE stage RUN NAME`. A project that registers its own backends
# in its own launcher (the registries' `register`) points this at that launcher, so that its children have them.
ENTRY_MODULE = "esc_evolve.cli.app"
TAIL_LINES = 30  # lines of a failed child's output quoted in the error


# ---------------------------------------------------------------------------------------------------------
# The orchestrator's side


def stage_processes(config: ExperimentConfig) -> bool:
    """Whether `esc-evolve run` starts each stage in its own process (`run.stage_processes`)."""
    mode = config.run.stage_processes
    if mode != "auto":
        return mode == "always"
    return config.generation.backend == "vllm" or cuda_devices(config) > 0


def cuda_devices(config: ExperimentConfig) -> int:
    """The CUDA devices this process sees (CUDA_VISIBLE_DEVICES) when the model runs on CUDA; 0 otherwise.
    Counting them creates no CUDA context: the orchestrator keeps every byte of GPU memory for its children."""
    import torch

    if config.model.device not in ("auto", "cuda") or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


def trains(config: ExperimentConfig, name: str) -> bool:
    """Whether stage `name` trains a model (and so runs data-parallel on several devices): sft (unless M0 is
    copied from another run), iterN.dpo and the SFT baseline's iterN.sft."""
    if name == "sft":
        return config.run.m0_from is None
    return name.startswith("iter") and name.endswith((".dpo", ".sft"))


def stage_argv(
    name: str,
    run_dir: Path,
    *,
    training: bool,
    devices: int,
    accelerate_config: Path | None = None,
    python: str = sys.executable,
    module: str = ENTRY_MODULE,
) -> list[str]:
    """The command of the child that runs stage `name`: a training stage on more than one device under
    `accelerate launch` (the config file given, or plain DDP), one process per device; any other stage as one
    process. The orchestrator runs on one node, so the visible devices decide the process count, whatever the
    file's `num_processes` says."""
    child = ["-m", module, "stage", str(run_dir), name]
    if not training or devices <= 1:
        return [python, *child]
    launch = [python, "-m", "accelerate.commands.launch", "--num_processes", str(devices)]
    if accelerate_config is not None:
        launch += ["--config_file", str(accelerate_config)]
    else:  # what configs/accelerate/multi-gpu.yaml says; precision comes from our config (sft.bf16), not from here
        launch += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launch, *child]


def refuse_launcher() -> None:
    """`esc-evolve run` under `accelerate launch`/torchrun would run the whole pipeline once per rank (each rank
    making the run directory, building an engine, appending pairs): refuse, and say what to do instead."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "esc-evolve run is the orchestrator: start it as one process, not under accelerate launch or "
            "torchrun; it launches each training stage under accelerate itself (run.accelerate_config, "
            "docs/scale.md)"
        )


def accelerate_file(config: ExperimentConfig) -> Path | None:
    """`run.accelerate_config` as an absolute path, checked before every child: a wrong path stops the run at its
    first stage, not hours later at training."""
    if config.run.accelerate_config is None:
        return None
    path = Path(config.run.accelerate_config).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"run.accelerate_config: {config.run.accelerate_config} is not a file")
    return path


def run_in_child(run: RunDir, name: str) -> dict[str, Any]:
    """Stage `name` in a child process; its summary. A StageFailedError with the exit status and the end of the
    child's output when it fails; whatever it saved before is there for --resume, as in-process."""
    layout, config = run.layout, run.config
    summary_file, log_file = layout.stage_summary_file(name), layout.stage_log_file(name)
    summary_file.unlink(missing_ok=True)  # one left by an attempt killed before it was recorded is not this one's
    argv = stage_argv(
        name,
        layout.root,
        training=trains(config, name),
        devices=cuda_devices(config),
        accelerate_config=accelerate_file(config),
        module=ENTRY_MODULE,
    )
    log.info("stage %s: child process %s (output in %s)", name, shlex.join(argv), log_file)
    status = _spawn(argv, log_file)
    summary = read_json(summary_file) if status == 0 else None
    if summary is None:
        raise StageFailedError(_failure(name, status, log_file))
    return summary


def _spawn(argv: list[str], log_file: Path) -> int:
    """Run `argv`, its output appended to `log_file` and copied to our stderr; its exit status. A child still
    running when we stop (Ctrl-C, an error) is terminated: no stage outlives the orchestrator's lock."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n".encode())
        out.flush()
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent())
        try:
            _copy_output(child.stdout, out)
            return child.wait()
        finally:
            if child.poll() is None:
                child.terminate()
                child.wait()


def _copy_output(source: IO[bytes] | None, out: IO[bytes]) -> None:
    """Copy the child's output as it comes (progress bars included) to the log file and to our stderr."""
    if source is None:
        return
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a chunk may cut a character
    while chunk := source.read1(65536):  # type: ignore[attr-defined]
        out.write(chunk)
        out.flush()
        sys.stderr.write(decode.decode(chunk))
        sys.stderr.flush()


def _die_with_parent() -> Callable[[], None] | None:
    """What the child calls before exec: on Linux, ask for SIGTERM when the orchestrator dies, even by SIGKILL,
    so that a resumed run never meets a stage of the killed one still writing. Looked up here, before the fork:
    the forked child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None:
        return None
    return lambda: prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def _failure(name: str, status: int, log_file: Path) -> str:
    """The error of a failed child: how it ended, the end of its output, and what to do."""
    if status < 0:
        ended = f"was killed by signal {signal.Signals(-status).name}"
    elif status == 0:
        ended = "ended without writing its summary"
    else:
        ended = f"failed with exit status {status}"
    tail = "\n".join(_tail(log_file, TAIL_LINES))
    return (
        f"stage {name} {ended} (its process: {log_file}); what it saved is kept, rerun with --resume to continue."
        f"\nlast lines of its output:\n{tail}"
    )


def _tail(path: Path, lines: int) -> list[str]:
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - 64 * 1024))
        text = handle.read().decode("utf-8", errors="replace")
    # A progress bar redraws its line with \r: keep what it showed last.
    return [line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:]]


# ---------------------------------------------------------------------------------------------------------
# The child's side: `esc-evolve stage RUN NAME`


def run_one_stage(run_dir: Path, name: str) -> None:
    """Stage `name` of the run at `run_dir`, for the orchestrator that holds the run's lock: its summary to
    `RUN/logs/stages/NAME.json` (by the main process, under accelerate), nothing to stages.json."""
    from esc_evolve.pipeline.stages import execute_stage, stages

    layout = RunLayout(run_dir)
    if not layout.config_file.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    if not lock_held(layout.lock_file):  # the orchestrator holds it for us: taking it ourselves would deadlock
        raise ConfigError(
            "esc-evolve stage runs one stage for `esc-evolve run`, which holds the run's lock; nothing holds it "
            f"now. Run the whole pipeline with `esc-evolve run CONFIG --resume`, or one stage with "
            f"`esc-evolve sft|pairs|dpo|eval` (they record it in {layout.stages_file})"
        )
    config = read_run_config(layout.root)
    main = int(os.environ.get("RANK", "0")) == 0  # set by accelerate launch (torchrun); a lone process is rank 0
    setup_logging(config.run.log_level if main else "WARNING", layout.log_file)
    plan = dict(stages(config))
    if name not in plan:
        raise ConfigError(f"run {run_dir} has no stage {name!r}; its stages: {', '.join(plan)}")
    summary = execute_stage(RunDir(layout, config), name, plan[name])
    if main:
        write_json_atomic(layout.stage_summary_file(name), summary)
