"""`esc-evolve run`: the whole method in one run directory, stage after stage.

Stages so far: `prepare` (load and check data, resolve and load the backbone, one smoke reply).
SFT (M0), self-evolution (M1, M2) and evaluation are added here as they land; each is skipped on
`--resume` once `stages.json` records it as finished.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from esc_evolve.config import ExperimentConfig
from esc_evolve.data import build_turn_samples, load_conversations
from esc_evolve.logging_setup import setup_logging
from esc_evolve.rundir import RunDir, write_json_atomic

log = logging.getLogger(__name__)


def run_pipeline(config: ExperimentConfig, resume: bool = False) -> Path:
    from transformers import set_seed

    run = RunDir.create(config, resume=resume)
    setup_logging(config.run.log_level, run.log_file)
    set_seed(config.run.seed)
    log.info("run directory: %s", run.path)
    for name, stage in STAGES:
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
    import torch

    from esc_evolve.data.prompts import build_messages, render_prompt
    from esc_evolve.models import load_model

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
            "%s: %d conversations, %d turn samples from %s",
            split,
            len(loaded.conversations),
            len(samples),
            source,
        )

    model, tokenizer = load_model(cfg.model)
    prompt = render_prompt(tokenizer, build_messages(samples[0].context, cfg.data.system_prompt))
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    summary["backbone"] = {
        "name": cfg.model.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(model.device),
        "dtype": str(model.dtype),
        "smoke_sample": samples[0].sample_id,
        "smoke_reply": reply,
    }
    write_json_atomic(run.path / "prepare.json", summary)
    log.info("backbone %s loaded; smoke reply: %s", cfg.model.name, reply)
    return summary


def _sft(run: RunDir) -> dict[str, Any]:
    from esc_evolve.training import sft_stage

    return sft_stage(run)


STAGES = [("prepare", prepare), ("sft", _sft)]
