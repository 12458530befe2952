"""`esc-evolve run`: the whole method in one run directory, stage after stage.

    prepare      load and check the data, resolve the backbone, one smoke reply       prepare.json
    sft          phase 1: LoRA SFT of the backbone                                    m0/
    iterN.pairs  phase 2: M_{N-1} answers, reflects, refines; filtered pairs          iterN/pairs.jsonl
    iterN.dpo    phase 2: DPO of M_{N-1} on its pairs, reference M_{N-1}              iterN/mN/
    eval         every model answers the eval contexts; metrics, CIs, report          report.html

A stage recorded as finished in `stages.json` is skipped on `--resume`; a stage killed midway continues from
what it saved (pairs are appended per chunk, training resumes from its last checkpoint).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from esc_evolve.config import ExperimentConfig
from esc_evolve.data import build_turn_samples, load_conversations
from esc_evolve.data.prompts import build_messages
from esc_evolve.logging_setup import setup_logging
from esc_evolve.rundir import RunDir, write_json_atomic

log = logging.getLogger(__name__)


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


def prepare(run: RunDir) -> dict[str, Any]:
    """Load the data and the backbone once, so that a broken setup fails before any training."""
    from esc_evolve.generation import GenerationRequest, build_generator

    cfg = run.config
    summary: dict[str, Any] = {}
    splits = {"train": cfg.data.train_path, "valid": cfg.data.valid_path}
    for split, source in splits.items():
        if source is None:
            continue
        loaded = load_conversations(source, skip_invalid=cfg.data.skip_invalid, limit=cfg.data.max_conversations)
        samples = build_turn_samples(loaded.conversations, cfg.data.context_window)
        summary[split] = {
            "source": source,
            "format": loaded.format,
            "conversations": len(loaded.conversations),
            "samples": len(samples),
            "skipped_invalid": len(loaded.skipped),
        }
        log.info(
            "%s: %d conversations, %d turn samples from %s", split, len(loaded.conversations), len(samples), source
        )
    first = build_turn_samples(
        load_conversations(cfg.data.train_path, skip_invalid=cfg.data.skip_invalid, limit=1).conversations,
        cfg.data.context_window,
    )[0]
    with build_generator(cfg.model, cfg.generation, seed=cfg.run.seed) as generator:
        request = GenerationRequest(messages=build_messages(first.context, cfg.data.system_prompt), max_new_tokens=32)
        reply = generator.generate([request], progress=False)[0].text.strip()
    summary["backbone"] = {"name": cfg.model.name, "smoke_sample": first.sample_id, "smoke_reply": reply}
    write_json_atomic(run.path / "prepare.json", summary)
    log.info("backbone %s loaded; smoke reply: %s", cfg.model.name, reply)
    return summary


def model_dir(run: RunDir, iteration: int) -> Path:
    """Where M_t lives: `m0/` after SFT, `iterT/mT/` after iteration T."""
    return run.path / "m0" if iteration == 0 else run.path / f"iter{iteration}" / f"m{iteration}"


def sft(run: RunDir) -> dict[str, Any]:
    from esc_evolve.training import sft_stage

    return sft_stage(run)


def pairs(run: RunDir, iteration: int) -> dict[str, Any]:
    """M_{t-1} answers, reflects and refines on this iteration's contexts; kept pairs -> preference.jsonl."""
    from esc_evolve.evolve.loop import generate_pairs, pairs_paths
    from esc_evolve.evolve.pairs import PairStore
    from esc_evolve.generation import build_generator
    from esc_evolve.models import load_tokenizer

    cfg = run.config
    pairs_file, preference_file = pairs_paths(run.path, iteration)
    store = PairStore(pairs_file)
    parent = model_dir(run, iteration - 1)
    with build_generator(cfg.model, cfg.generation, parent, seed=cfg.run.seed + iteration) as generator:
        summary = generate_pairs(cfg, iteration, generator, load_tokenizer(cfg.model), store)
    summary["exported_pairs"] = store.export_preference(preference_file)
    return summary


def dpo(run: RunDir, iteration: int) -> dict[str, Any]:
    """Train M_t; when the iteration kept no pair, M_t is M_{t-1} unchanged (said in the log and summary)."""
    from esc_evolve.training.dpo import NoPairsError, run_dpo

    parent, target = model_dir(run, iteration - 1), model_dir(run, iteration)
    try:
        return run_dpo(run, iteration, parent)
    except NoPairsError as exc:
        log.warning("%s -- m%d is m%d unchanged", exc, iteration, iteration - 1)
        copy_model(parent, target)
        return {"iteration": iteration, "pairs": 0, "steps": 0, "unchanged_from": parent.name}


def copy_model(source: Path, target: Path) -> None:
    """A copy of the adapter at `source` whose lineage points at `source`'s own parent."""
    import shutil

    from esc_evolve.models.lineage import adapter_chain, write_lineage

    base, chain = adapter_chain(source)
    staging = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    write_lineage(staging, base or run_base(source), chain[-2] if len(chain) > 1 else None)
    staging.replace(target)


def run_base(folder: Path) -> str:
    import json

    return json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]


def evaluation(run: RunDir) -> dict[str, Any]:
    from esc_evolve.evaluation.stage import eval_stage

    return eval_stage(run)


def stages(config: ExperimentConfig) -> list[tuple[str, Callable[[RunDir], dict[str, Any]]]]:
    """The stages of a run, in order, for `evolve.iterations` iterations."""
    plan: list[tuple[str, Callable[[RunDir], dict[str, Any]]]] = [("prepare", prepare), ("sft", sft)]
    for iteration in range(1, config.evolve.iterations + 1):
        plan.append((f"iter{iteration}.pairs", functools.partial(pairs, iteration=iteration)))
        plan.append((f"iter{iteration}.dpo", functools.partial(dpo, iteration=iteration)))
    plan.append(("eval", evaluation))
    return plan
