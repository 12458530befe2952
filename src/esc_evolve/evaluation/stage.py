"""The evaluation stage of a run: every model answers the same contexts, then `evaluate` scores them.

Models are named as in the method: `base` (the backbone), `m0` (after SFT), `m1`, `m2`, ... (after each
evolve iteration), and `human` (the reference responses). Responses go to `RUN/eval/responses.jsonl`, one model
at a time; a model whose responses are all there is not generated again on resume. The report is written to
`RUN/report.html`, `RUN/report.md`, `RUN/metrics.json` and `RUN/plots/`.

`evaluate_run` is the stage with its choices open (models, output folder); `esc-evolve eval RUN` calls it on an
existing run directory, with the run's config (`load_run_config`).
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esc_evolve.config import ExperimentConfig, load_config
from esc_evolve.data import TurnSample, build_turn_samples, load_conversations
from esc_evolve.data.prompts import build_messages
from esc_evolve.errors import ConfigError
from esc_evolve.evaluation.responses import (
    HUMAN,
    ResponseRow,
    ResponsesTable,
    build_table,
    read_rows,
    samples_by_id,
    write_responses,
)
from esc_evolve.rundir import RunDir

if TYPE_CHECKING:
    from esc_evolve.evaluation.evaluate import EvalResult

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

    ids = {s.sample_id for s in samples}
    done = _complete_models(out, ids)
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
        # A model that answered some of these contexts before (another --max-contexts) is replaced on them,
        # so that no (context, model) pair is written twice.
        previous = [r for r in read_rows(out) if r.model != name or r.sample_id not in ids] if out.is_file() else []
        write_responses(out, [*previous, *rows])  # atomic: a kill mid-write keeps the previous models


def read_eval_table(path: Path, samples: list[TurnSample], models: list[str], include_human: bool) -> ResponsesTable:
    """The rows of `path` for these contexts and models: the file may also hold other splits or models."""
    ids = {s.sample_id for s in samples}
    rows = [r for r in read_rows(path) if r.sample_id in ids and r.model in models]
    return build_table(rows, samples_by_id(samples), include_human=include_human, models=models)


def eval_stage(run: RunDir) -> dict[str, Any]:
    """Pipeline stage `eval`: generate with every model of the run, score, write the report."""
    return evaluate_run(run.path, run.config)


def evaluate_run(
    run_path: Path,
    config: ExperimentConfig,
    *,
    models: list[str] | None = None,
    out: Path | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate with the run's models of `models` (default `eval.models`) that exist, score them, write the report
    to `out` (default the run). Responses in `out/eval/responses.jsonl` are reused: complete models are skipped."""
    from esc_evolve.evaluation.report import write_report

    out = out or run_path
    wanted = models or config.eval.models
    samples = eval_contexts(config)
    adapters = model_adapters(run_path, wanted)
    missing = [m for m in models or [] if m != HUMAN and m not in adapters]
    if missing or not adapters:  # named models must exist; the config's list may name models not reached yet
        have = ", ".join([*model_adapters(run_path, _run_models(run_path)), HUMAN])
        asked = f"model(s) {', '.join(missing)} not" if missing else "no generated model to evaluate"
        raise ConfigError(f"{asked} in {run_path} (it has: {have})")
    responses = out / "eval" / "responses.jsonl"
    _start_from_run_responses(run_path / "eval" / "responses.jsonl", responses)
    generate_responses(config, samples, adapters, responses)
    table = read_eval_table(responses, samples, list(adapters), include_human=HUMAN in wanted)
    result = score_table(table, config, out / "eval")
    extra = {"run": str(run_path), "responses_file": str(responses), **(provenance or {})}
    paths = write_report(result, table, out, extra)
    log.info("evaluation report: %s", paths["html"])
    return {"contexts": len(table), "models": table.models, "report": str(paths["html"]), "notes": result.notes}


def _start_from_run_responses(run_responses: Path, responses: Path) -> None:
    """A new output folder starts from the run's own responses, so that re-scoring elsewhere (another judge,
    other metrics) generates nothing that the run already has; other contexts or models are generated."""
    if responses.is_file() or not run_responses.is_file() or responses.resolve() == run_responses.resolve():
        return
    responses.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_responses, responses)


def score_table(table: ResponsesTable, config: ExperimentConfig, records_dir: Path | None) -> EvalResult:
    """`evaluate` with the config's settings and its judge backend (built only when the judge metric runs)."""
    from esc_evolve.evaluation.evaluate import evaluate
    from esc_evolve.evaluation.judge_backend import build_judge
    from esc_evolve.evaluation.settings import EvaluationSettings

    settings = EvaluationSettings.for_experiment(config)
    judge = build_judge(config) if "judge" in settings.metrics else None
    try:
        return evaluate(table, settings, judge=judge, out_dir=records_dir)
    finally:
        if judge is not None:
            judge.close()  # a local judge holds a model in memory


def load_run_config(run_path: Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The config a run was made with (`RUN/config.yaml`) plus `eval.KEY=VALUE` overrides.

    Only the eval section may change: responses already generated stay valid only for the same models, data and
    decoding settings."""
    saved = run_path / "config.yaml"
    if not saved.is_file():
        what = "does not exist" if not run_path.exists() else "is not a run directory (no config.yaml)"
        raise ConfigError(f"{run_path} {what}: give a folder written by `esc-evolve run`, e.g. runs/quickstart")
    others = [o for o in overrides or [] if not o.strip().startswith("eval.")]
    if others:
        raise ConfigError(f"only eval.KEY=VALUE overrides apply to an existing run, got: {', '.join(others)}")
    return load_config(saved, overrides)


def _run_models(run_path: Path) -> list[str]:
    """base, m0 and every mK with an iterK/ folder, in order."""
    iterations = sorted(int(p.name[4:]) for p in run_path.glob("iter*") if p.name[4:].isdigit())
    return ["base", "m0", *(f"m{k}" for k in iterations)]


def _complete_models(path: Path, sample_ids: set[str]) -> set[str]:
    if not path.is_file():
        return set()
    answered: dict[str, set[str]] = {}
    for row in read_rows(path):
        answered.setdefault(row.model, set()).add(row.sample_id)
    return {model for model, ids in answered.items() if sample_ids <= ids}
