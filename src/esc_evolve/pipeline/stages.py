"""The stages of a run: each takes the run directory, reads its inputs from the layout, calls one stage function
and returns its summary for `stages.json`."""

from __future__ import annotations

import functools
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from esc_evolve.config import ExperimentConfig
from esc_evolve.data import load_split, load_train
from esc_evolve.data.prompts import build_messages
from esc_evolve.logging_setup import setup_logging
from esc_evolve.pipeline.rundir import RunDir
from esc_evolve.storage import publish_folder, staging_folder, write_json_atomic

log = logging.getLogger(__name__)

Stage = Callable[[RunDir], dict[str, Any]]


def run_pipeline(config: ExperimentConfig, resume: bool = False) -> Path:
    from transformers import set_seed

    run = RunDir.create(config, resume=resume)
    setup_logging(config.run.log_level, run.log_file)
    set_seed(config.run.seed)
    log.info("run directory: %s", run.path)
    for name, stage in stages(config):
        if run.stage_done(name):
            log.info("stage %s: already finished, skipped", name)
            continue
        started = time.perf_counter()
        summary = stage(run)
        summary["wall_seconds"] = round(time.perf_counter() - started, 2)
        run.mark_done(name, summary)
        log.info("stage %s: finished in %.1f s", name, summary["wall_seconds"])
    return run.path


def stages(config: ExperimentConfig) -> list[tuple[str, Stage]]:
    """The stages of a run, in order, for `evolve.iterations` iterations."""
    from esc_evolve.pipeline.evaluation import eval_stage

    plan: list[tuple[str, Stage]] = [("prepare", prepare), ("sft", sft)]
    for iteration in range(1, config.evolve.iterations + 1):
        plan.append((f"iter{iteration}.pairs", functools.partial(pairs, iteration=iteration)))
        plan.append((f"iter{iteration}.dpo", functools.partial(dpo, iteration=iteration)))
    plan.append(("eval", eval_stage))
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
    return train_sft(
        cfg.sft,
        cfg.model,
        cfg.data,
        layout.model_dir(0),
        seed=cfg.run.seed,
        work_dir=layout.sft_work_dir,
        log_dir=layout.tensorboard_dir("sft"),
        merged_dir=layout.merged_m0_dir,
    )


def pairs(run: RunDir, iteration: int) -> dict[str, Any]:
    """M_{t-1} answers, reflects and refines on this iteration's contexts; kept pairs -> preference.jsonl."""
    from esc_evolve.evolve.loop import generate_pairs, select_contexts
    from esc_evolve.evolve.pairs import PairStore
    from esc_evolve.generation import build_generator

    cfg, layout = run.config, run.layout
    contexts = select_contexts(load_train(cfg.data).samples, cfg.evolve, cfg.run.seed, iteration)
    parent = layout.model_dir(iteration - 1)
    with build_generator(cfg.model, cfg.generation, parent, seed=cfg.run.seed + iteration) as generator:
        summary = generate_pairs(
            cfg.evolve,
            contexts,
            generator,
            layout.pairs_file(iteration),
            iteration=iteration,
            seed=cfg.run.seed,
            system_prompt=cfg.data.system_prompt,
            chunk_size=cfg.generation.batch_size,
        )
    summary["exported_pairs"] = PairStore(layout.pairs_file(iteration)).export_preference(
        layout.preference_file(iteration)
    )
    return summary


def dpo(run: RunDir, iteration: int) -> dict[str, Any]:
    """Train M_t; when the iteration kept no pair, M_t is M_{t-1} unchanged (said in the log and summary)."""
    from esc_evolve.training import NoPairsError, train_dpo

    cfg, layout = run.config, run.layout
    parent, target = layout.model_dir(iteration - 1), layout.model_dir(iteration)
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
        )
    except NoPairsError as exc:
        log.warning("%s -- m%d is m%d unchanged", exc, iteration, iteration - 1)
        copy_model(parent, target)
        return {"iteration": iteration, "pairs": 0, "steps": 0, "unchanged_from": parent.name}
    return {"iteration": iteration, **summary}


def copy_model(source: Path, target: Path) -> None:
    """A copy of the adapter at `source` whose lineage points at `source`'s own parent."""
    from esc_evolve.models.lineage import adapter_chain, base_of, write_lineage

    base, chain = adapter_chain(source)
    staging = staging_folder(target)
    shutil.copytree(source, staging)
    write_lineage(staging, base or base_of(source), chain[-2] if len(chain) > 1 else None)
    publish_folder(staging, target)
