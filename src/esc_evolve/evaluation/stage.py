"""The evaluation stage of a run: every model answers the same contexts, then `evaluate` scores them.

Models are named as in the method: `base` (the backbone), `m0` (after SFT), `m1`, `m2`, ... (after each
evolve iteration), and `human` (the reference responses). Responses go to `RUN/eval/responses.jsonl`, one model
at a time; a model whose responses are all there is not generated again on resume. The report is written to
`RUN/report.html`, `RUN/report.md`, `RUN/metrics.json` and `RUN/plots/`.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from esc_evolve.config import ExperimentConfig
from esc_evolve.data import TurnSample, build_turn_samples, load_conversations
from esc_evolve.data.prompts import build_messages
from esc_evolve.evaluation.responses import HUMAN, ResponseRow, read_responses, read_rows, write_responses
from esc_evolve.rundir import RunDir

log = logging.getLogger(__name__)


def model_adapters(run_path: Path, names: list[str]) -> dict[str, Path | None]:
    """The models of `names` that exist in the run: `base` -> None (no adapter), `mK` -> its adapter folder."""
    found: dict[str, Path | None] = {}
    for name in names:
        if name == HUMAN:
            continue
        if name == "base":
            found[name] = None
            continue
        folder = run_path / name if name == "m0" else run_path / f"iter{name.removeprefix('m')}" / name
        if (folder / "adapter_config.json").is_file():
            found[name] = folder
        else:
            log.info("evaluation: model %s not in %s, left out", name, run_path)
    return found


def eval_contexts(config: ExperimentConfig) -> list[TurnSample]:
    """A seeded sample of `eval.max_contexts` turn-level contexts of the eval split (all when unset)."""
    source = config.eval.split_path or config.data.valid_path
    if source is None:
        from esc_evolve.errors import ConfigError

        raise ConfigError("evaluation needs eval.split_path or data.valid_path")
    conversations = load_conversations(source, skip_invalid=config.data.skip_invalid).conversations
    samples = build_turn_samples(conversations, config.data.context_window)
    if config.eval.max_contexts and len(samples) > config.eval.max_contexts:
        samples = random.Random(config.run.seed).sample(samples, config.eval.max_contexts)
    return samples


def generate_responses(
    config: ExperimentConfig, samples: list[TurnSample], models: dict[str, Path | None], out: Path
) -> None:
    """Append each model's responses to `out`, skipping models already complete there."""
    from esc_evolve.generation import GenerationRequest, build_generator

    done = _complete_models(out, {s.sample_id for s in samples})
    for name, adapter in models.items():
        if name in done:
            log.info("evaluation: responses of %s already generated", name)
            continue
        log.info("evaluation: generating %d responses with %s", len(samples), name)
        with build_generator(config.model, config.generation, adapter, seed=config.run.seed) as generator:
            results = generator.generate(
                [
                    GenerationRequest(messages=build_messages(s.context, config.data.system_prompt), id=s.sample_id)
                    for s in samples
                ]
            )
        rows = [
            ResponseRow(
                sample_id=s.sample_id,
                model=name,
                response=r.text.strip(),
                sample=s,
                meta={"finish_reason": r.finish_reason, "tokens": r.num_tokens},
            )
            for s, r in zip(samples, results, strict=True)
        ]
        previous = read_rows(out) if out.is_file() else []
        write_responses(out, [*previous, *rows])  # atomic: a kill mid-write keeps the previous models


def eval_stage(run: RunDir) -> dict[str, Any]:
    """Pipeline stage `eval`: generate with every model of the run, score, write the report."""
    from esc_evolve.evaluation.evaluate import evaluate
    from esc_evolve.evaluation.report import write_report
    from esc_evolve.evaluation.settings import EvaluationSettings

    config = run.config
    samples = eval_contexts(config)
    models = model_adapters(run.path, config.eval.models)
    responses = run.path / "eval" / "responses.jsonl"
    generate_responses(config, samples, models, responses)
    table = read_responses(responses, include_human=HUMAN in config.eval.models, models=list(models))
    settings = EvaluationSettings.for_experiment(config)
    result = evaluate(table, settings, out_dir=run.path / "eval")
    paths = write_report(result, table, run.path, {"run": str(run.path), "responses_file": str(responses)})
    log.info("evaluation report: %s", paths["html"])
    return {"contexts": len(table), "models": table.models, "report": str(paths["html"]), "notes": result.notes}


def _complete_models(path: Path, sample_ids: set[str]) -> set[str]:
    if not path.is_file():
        return set()
    answered: dict[str, set[str]] = {}
    for row in read_rows(path):
        answered.setdefault(row.model, set()).add(row.sample_id)
    return {model for model, ids in answered.items() if sample_ids <= ids}
