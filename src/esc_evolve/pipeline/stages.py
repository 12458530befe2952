"""The stages of a run: each takes the run directory, reads its inputs from the layout, calls one stage function
and returns its summary for `stages.json`."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from esc_evolve.config import ExperimentConfig
from esc_evolve.data import load_split, load_train
from esc_evolve.data.prompts import build_messages
from esc_evolve.errors import ConfigError, DiskFullError
from esc_evolve.logging_setup import setup_logging
from esc_evolve.pipeline.layout import RunLayout
from esc_evolve.pipeline.rundir import RunDir, RunLock
from esc_evolve.storage import publish_folder, read_json, staging_folder, write_atomic, write_json_atomic

log = logging.getLogger(__name__)

Stage = Callable[[RunDir], dict[str, Any]]


def run_pipeline(config: ExperimentConfig, resume: bool = False) -> Path:
    """Run every stage not yet finished, in order, as the one writer of the run directory: each in this process,
    or each in its own (`run.stage_processes`, pipeline/processes.py) with this one as the orchestrator."""
    from esc_evolve.pipeline.processes import refuse_launcher, stage_processes

    refuse_launcher()
    layout = RunLayout.of(config.run)
    setup_logging(config.run.log_level, layout.log_file)
    with RunLock(layout.lock_file):
        run = RunDir.create(config, resume=resume)
        in_child = stage_processes(config)
        log.info("run directory: %s (stages in %s)", run.path, "their own processes" if in_child else "this process")
        for name, stage in stages(config):
            if run.stage_done(name):
                log.info("stage %s: already finished, skipped", name)
                continue
            run_stage(run, name, stage, in_child=in_child)
    return run.path


def run_stage(run: RunDir, name: str, stage: Stage, in_child: bool = False) -> None:
    """One stage, here or in a child process, recorded in stages.json when it finishes."""
    from esc_evolve.pipeline.processes import run_in_child

    log.info("stage %s: started", name)
    started = time.perf_counter()
    summary = run_in_child(run, name) if in_child else execute_stage(run, name, stage)
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    run.mark_done(name, summary)
    log.info("stage %s: finished in %.1f s", name, summary["wall_seconds"])


def execute_stage(run: RunDir, name: str, stage: Stage) -> dict[str, Any]:
    """The stage function, from the run's seed; its summary. A full disk stops the run with a message: what was
    finished before (stages, written pairs, checkpoints, published models) stays usable by --resume."""
    from transformers import set_seed

    set_seed(run.config.run.seed)  # each stage starts from the same RNG state, resumed or not, in any process
    try:
        return stage(run)
    except Exception as exc:
        full = _disk_full(exc)
        if full is None:
            raise
        where = f" writing {full.filename}" if isinstance(full, OSError) and full.filename else ""
        raise DiskFullError(
            f"stage {name}: no space left on the device{where}; free some space and rerun with --resume "
            "(finished stages, written pairs and checkpoints are kept)"
        ) from exc


def _disk_full(exc: BaseException | None) -> BaseException | None:
    """The ENOSPC error in `exc`'s chain: an OSError, or the message of a writer that wraps one (safetensors)."""
    while exc is not None:
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def stages(config: ExperimentConfig) -> list[tuple[str, Stage]]:
    """The stages of a run, in order, for `evolve.iterations` iterations."""
    from esc_evolve.pipeline.evaluation import eval_stage, simulate_stage

    plan: list[tuple[str, Stage]] = [("prepare", prepare), ("sft", sft)]
    for iteration in range(1, config.evolve.iterations + 1):
        if config.evolve.update == "sft":  # the SFT baseline: human replies of the same contexts, no pairs
            plan.append((f"iter{iteration}.sft", functools.partial(sft_more, iteration=iteration)))
            continue
        plan.append((f"iter{iteration}.pairs", functools.partial(pairs, iteration=iteration)))
        plan.append((f"iter{iteration}.dpo", functools.partial(dpo, iteration=iteration)))
    plan.append(("eval", eval_stage))
    if config.simulate.in_run:
        plan.append(("eval.simulate", simulate_stage))
    return plan


def prepare(run: RunDir) -> dict[str, Any]:
    """Load the data and the backbone once, so that a broken setup fails before any training."""
    from esc_evolve.generation import GenerationRequest, build_generator

    cfg = run.config
    train = load_train(cfg.data)
    summary: dict[str, Any] = {"train": train.summary()}
    if cfg.data.valid_path is not None:
        summary["valid"] = load_split(cfg.data.valid_path, cfg.data).summary()
    for split, info in summary.items():
        log.info("%s: %d conversations, %d turn samples from %s", split, *_counts(info))
    first = train.samples[0]
    with build_generator(cfg.model, cfg.generation, seed=cfg.run.seed) as generator:
        request = GenerationRequest(messages=build_messages(first.context, cfg.data.system_prompt), max_new_tokens=32)
        reply = generator.generate([request], progress=False)[0].text.strip()
    summary["backbone"] = {"name": cfg.model.name, "smoke_sample": first.sample_id, "smoke_reply": reply}
    write_json_atomic(run.layout.prepare_file, summary)
    log.info("backbone %s loaded; smoke reply: %s", cfg.model.name, reply)
    return summary


def _counts(info: dict[str, Any]) -> tuple[Any, Any, Any]:
    return info["conversations"], info["samples"], info["source"]


def sft(run: RunDir) -> dict[str, Any]:
    from esc_evolve.training import train_sft

    cfg, layout = run.config, run.layout
    if cfg.run.m0_from:
        summary = share_m0(Path(cfg.run.m0_from).expanduser(), layout.model_dir(0), cfg.model.name)
        return served(run, 0, summary)
    summary = train_sft(
        cfg.sft,
        cfg.model,
        cfg.data,
        layout.model_dir(0),
        seed=cfg.run.seed,
        work_dir=layout.sft_work_dir,
        log_dir=layout.tensorboard_dir("sft"),
        merged_dir=layout.merged_m0_dir,
    )
    return served(run, 0, summary)


def served(run: RunDir, iteration: int, summary: dict[str, Any]) -> dict[str, Any]:
    """Write M_t's whole adapter chain as one artifact an engine can serve (models/served.py; its kind and rank
    are in its own `esc_served.json`); `summary` is returned as it is. Only for the engines that serve it (vLLM,
    a farm of OpenAI-compatible servers): the transformers backend loads the chain itself, and on a CPU the
    artifact would cost a backbone load and a copy of the weights per iteration for nothing."""
    from esc_evolve.models.served import write_served

    if run.config.generation.backend == "transformers" or not _main_process(run.config):  # one writer
        return summary
    write_served(run.config.model, run.layout.model_dir(iteration))
    return summary


def _main_process(cfg: ExperimentConfig) -> bool:
    from esc_evolve.training.settings import process_state

    return bool(process_state(cfg.model).is_main_process)


def share_m0(source: Path, target: Path, backbone: str) -> dict[str, Any]:
    """Start from another run's M0 instead of training one (`run.m0_from`): its adapter is copied, lineage
    included, and the summary is its training summary plus where it came from."""
    from esc_evolve.models.lineage import adapter_chain
    from esc_evolve.training.sft import SUMMARY_FILE

    folder = source if (source / "adapter_config.json").is_file() else RunLayout(source).model_dir(0)
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"run.m0_from: {source} is neither a run directory with an m0/ nor an adapter folder")
    base, chain = adapter_chain(folder)
    if len(chain) != 1:
        raise ConfigError(f"run.m0_from: {folder} is not an M0: it is trained on top of {chain[-2]}")
    if base is not None and base != backbone:
        raise ConfigError(f"run.m0_from: {folder} was trained on {base!r}, this run's model.name is {backbone!r}")
    copy_model(folder, target)
    log.info("m0: copied from %s (SFT not repeated)", folder)
    return {**(read_json(folder / SUMMARY_FILE) or {}), "m0_from": str(folder.resolve())}


def pairs(run: RunDir, iteration: int, shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """M_{t-1} answers, reflects and refines on this iteration's contexts; kept pairs -> preference.jsonl.

    With `shard` (k, N): only shard k's contexts, into their own file (evolve/pairs.py), nothing exported. Without:
    the shard files already written are merged first, and only the contexts none of them holds are generated."""
    from esc_evolve.evolve.loop import select_contexts
    from esc_evolve.evolve.pairs import merge_shards, select_shard, shard_file, shard_files, shard_lock_file

    cfg, layout = run.config, run.layout
    contexts = select_contexts(load_train(cfg.data).samples, cfg.evolve, cfg.run.seed, iteration)
    out, anchor = layout.pairs_file(iteration), layout.anchor_file(iteration)
    if shard is None:
        with contextlib.ExitStack() as held:  # a shard still being written is not merged
            for file in shard_files(out):
                held.enter_context(RunLock(shard_lock_file(file)))
            merge_shards(out, [s.sample_id for s in contexts])
        return _pairs(run, iteration, contexts, out, anchor)
    out, anchor = shard_file(out, *shard), shard_file(anchor, *shard)
    with RunLock(shard_lock_file(out)):
        return _pairs(run, iteration, select_shard(contexts, *shard), out, anchor, export=False)


def _pairs(
    run: RunDir, iteration: int, contexts: list[Any], out: Path, anchor: Path, export: bool = True
) -> dict[str, Any]:
    from esc_evolve.evolve.loop import generate_pairs
    from esc_evolve.evolve.pairs import PairStore
    from esc_evolve.generation import build_generator
    from esc_evolve.generation.factory import requests_per_call

    cfg, layout = run.config, run.layout
    parent = layout.model_dir(iteration - 1)
    # Anchored rejected side: M0's replies to these contexts (from iteration 2 on; in iteration 1 M0 is M_t).
    anchored = cfg.evolve.rejected_from == "m0" and iteration > 1
    todo = [s for s in contexts if s.sample_id not in PairStore(out).done_ids()]
    rejected = anchor_replies(run, todo, iteration, anchor) if anchored and todo else None
    with build_generator(cfg.model, cfg.generation, parent, seed=cfg.run.seed + iteration) as generator:
        summary = generate_pairs(
            cfg.evolve,
            contexts,
            generator,
            out,
            iteration=iteration,
            seed=cfg.run.seed,
            system_prompt=cfg.data.system_prompt,
            chunk_size=requests_per_call(cfg.generation),
            rejected=rejected,
            rejected_model="m0" if anchored else None,
        )
    if export:
        summary["exported_pairs"] = PairStore(out).export_preference(layout.preference_file(iteration))
    return summary


def anchor_replies(run: RunDir, contexts: list[Any], iteration: int, file: Path | None = None) -> dict[str, Any]:
    """M0's direct replies to these contexts (`iterN/anchor.jsonl`, or a shard's `file`), generated once as M_t's
    drafts are (same requests, same seeds, same decoding): the rejected side with `evolve.rejected_from: m0`."""
    from esc_evolve.evolve.loop import draft_request
    from esc_evolve.generation import GenerationResult, build_generator

    cfg, file = run.config, file or run.layout.anchor_file(iteration)
    saved = {row["request_id"]: GenerationResult(**row) for row in _read_jsonl(file)}
    if {s.sample_id for s in contexts} <= saved.keys():
        return saved
    seed = cfg.run.seed + iteration  # the seed generate_pairs gives M_t's drafts
    requests = [draft_request(build_messages(s.context, cfg.data.system_prompt), s, seed) for s in contexts]
    m0 = run.layout.model_dir(0)
    with build_generator(cfg.model, cfg.generation, m0, seed=cfg.run.seed + iteration) as generator:
        results = generator.generate(requests)
    rows = [
        {"request_id": r.request_id, "text": r.text, "num_tokens": r.num_tokens, "finish_reason": r.finish_reason}
        for r in results
    ]
    write_atomic(file, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return {r.request_id: r for r in results}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def dpo(run: RunDir, iteration: int) -> dict[str, Any]:
    """Train M_t; when the iteration kept no pair, M_t is M_{t-1} unchanged (said in the log and summary)."""
    from esc_evolve.training import NoPairsError, train_dpo

    cfg, layout = run.config, run.layout
    parent, target = layout.model_dir(iteration - 1), layout.model_dir(iteration)
    reference = layout.model_dir(0) if cfg.dpo.reference == "m0" and iteration > 1 else None
    try:
        summary = train_dpo(
            cfg.dpo,
            cfg.model,
            parent,
            layout.preference_file(iteration),
            target,
            seed=cfg.run.seed,
            work_dir=layout.dpo_work_dir(iteration),
            log_dir=layout.tensorboard_dir(f"dpo{iteration}"),
            reference=reference,
        )
    except NoPairsError as exc:
        log.warning("%s -- m%d is m%d unchanged", exc, iteration, iteration - 1)
        if _main_process(cfg):  # under accelerate (`esc-evolve dpo`), one writer
            copy_model(parent, target)
        return served(run, iteration, {"iteration": iteration, "pairs": 0, "steps": 0, "unchanged_from": parent.name})
    return served(run, iteration, {"iteration": iteration, **summary})


def sft_more(run: RunDir, iteration: int) -> dict[str, Any]:
    """The SFT baseline's iteration (`evolve.update: sft`): M_t+1 = SFT of M_t on the human replies of the
    contexts this iteration's pairs would use, with the dpo section's trainer settings, for as many optimisation
    steps as `evolve.match_steps_of`'s iterN.dpo took (else the dpo schedule on every context)."""
    from esc_evolve.config import SFTSettings, TrainerSettings
    from esc_evolve.evolve.loop import select_contexts
    from esc_evolve.training import train_sft_on
    from esc_evolve.training.data import sample_to_row

    cfg, layout = run.config, run.layout
    contexts = select_contexts(load_train(cfg.data).samples, cfg.evolve, cfg.run.seed, iteration)
    parent, target = layout.model_dir(iteration - 1), layout.model_dir(iteration)
    steps = matched_steps(cfg.evolve.match_steps_of, iteration)
    summary: dict[str, Any] = {"iteration": iteration, "contexts": len(contexts), "matched_steps": steps}
    if steps == 0:  # the matched run trained nothing in this iteration: neither does its baseline
        log.warning(
            "iteration %d: the matched run took no DPO step -- m%d is m%d unchanged",
            iteration,
            iteration,
            iteration - 1,
        )
        if _main_process(cfg):  # under accelerate (a stage process on several GPUs), one writer
            copy_model(parent, target)
        return {**summary, "steps": 0, "unchanged_from": parent.name}
    trainer = {name: getattr(cfg.dpo, name) for name in TrainerSettings.model_fields}
    settings = SFTSettings(**{**trainer, "max_steps": steps if steps is not None else cfg.dpo.max_steps})
    rows = [sample_to_row(s, cfg.data.system_prompt) for s in contexts]
    trained = train_sft_on(
        settings,
        cfg.model,
        parent,
        rows,
        target,
        seed=cfg.run.seed,
        work_dir=layout.sft_more_work_dir(iteration),
        log_dir=layout.tensorboard_dir(f"sft{iteration}"),
    )
    return served(run, iteration, {**summary, **trained})


def matched_steps(run_dir: str | None, iteration: int) -> int | None:
    """How many optimisation steps iteration `iteration`'s DPO took in `run_dir` (None: no run to match)."""
    if run_dir is None:
        return None
    done = read_json(RunLayout(Path(run_dir).expanduser()).stages_file) or {}
    stage = done.get(f"iter{iteration}.dpo")
    if stage is None:
        raise ConfigError(f"evolve.match_steps_of: {run_dir} has no finished stage iter{iteration}.dpo to match")
    return int(stage["steps"])


def copy_model(source: Path, target: Path) -> None:
    """A copy of the adapter at `source` whose lineage points at `source`'s own parent."""
    from esc_evolve.models.lineage import adapter_chain, base_of, write_lineage

    base, chain = adapter_chain(source)
    staging = staging_folder(target)
    shutil.copytree(source, staging)
    write_lineage(staging, base or base_of(source), chain[-2] if len(chain) > 1 else None)
    publish_folder(staging, target)
