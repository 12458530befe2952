"""The evaluation stage of a run: every model answers the same contexts, then `evaluation.evaluate` scores them.

Models are named as in the method: `base` (the backbone), `m0` (after SFT), `m1`, `m2`, ... (after each evolve
iteration), and `human` (the reference responses). Responses go to `eval/responses.jsonl`, one model at a time; a
model whose responses are all there is not generated again on resume. The report also shows how well each
iteration's reflections (what M_t inferred about the seekers while self-evolving) match the gold profiles.

`evaluate_run` is the stage with its choices open (models, output folder); `esc-evolve eval RUN` calls it on an
existing run directory, with the run's config (`load_run_config`).
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esc_evolve.config import EvolveSettings, ExperimentConfig, GenerationSettings, ModelSettings
from esc_evolve.data import TurnSample, load_split, load_train
from esc_evolve.data.prompts import build_messages
from esc_evolve.errors import ConfigError
from esc_evolve.evaluation.responses import (
    HUMAN,
    Reflection,
    ResponseRow,
    ResponsesTable,
    build_table,
    read_rows,
    samples_by_id,
    write_responses,
)
from esc_evolve.pipeline.layout import RunLayout, refines_at_inference
from esc_evolve.pipeline.rundir import RunDir
from esc_evolve.storage import read_json, write_json_atomic

if TYPE_CHECKING:
    from esc_evolve.evaluation.evaluate import EvalResult
    from esc_evolve.evolve.pairs import PairRecord

log = logging.getLogger(__name__)


def eval_stage(run: RunDir) -> dict[str, Any]:
    """Pipeline stage `eval`: generate with every model of the run, score, write the report."""
    return evaluate_run(run.layout, run.config)


def simulate_stage(run: RunDir) -> dict[str, Any]:
    """Pipeline stage `eval.simulate` (with `simulate.in_run`): the run's models (`simulate.models`, default m0
    and the newest) talk with simulated seekers; transcripts, scores and report in `RUN/eval/simulate/`."""
    import functools

    from esc_evolve.generation import build_generator
    from esc_evolve.simulation import load_role_cards
    from esc_evolve.simulation.rollout import Supporter, select_cards
    from esc_evolve.simulation.runner import simulate_models

    config, layout = run.config, run.layout
    names = config.simulate.models or list(dict.fromkeys(["m0", layout.model_names()[-1]]))
    missing = [n for n in names if n == HUMAN or not _exists(layout, n)]
    if missing:
        raise ConfigError(f"simulate.models: {', '.join(missing)} not in {layout.root}")
    supporters = [
        Supporter(
            name,
            f"{name} of {layout.root}",
            functools.partial(
                build_generator, config.model, config.generation, layout.adapter_of(name), seed=config.run.seed
            ),
            config.data.system_prompt,
        )
        for name in names
    ]
    pool = load_role_cards(config.simulate.cards_path)
    cards = select_cards(pool, config.simulate.max_cards, config.run.seed)
    return simulate_models(cards, supporters, config, layout.eval_dir / "simulate", pool=pool)


def evaluate_run(
    layout: RunLayout,
    config: ExperimentConfig,
    *,
    models: list[str] | None = None,
    out: RunLayout | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate with the run's models of `models` (default `eval.models`) that exist, score them, write the report
    to `out` (default the run). Responses in `out`'s responses file are reused: complete models are skipped."""
    from esc_evolve.evaluation.report import write_report

    out = out or layout
    wanted = models or config.eval.models
    adapters = {name: layout.adapter_of(name) for name in wanted if name != HUMAN and _exists(layout, name)}
    missing = [m for m in models or [] if m != HUMAN and m not in adapters]
    if missing or not adapters:  # named models must exist; the config's list may name models not reached yet
        have = ", ".join([*layout.model_names(), HUMAN])
        asked = f"model(s) {', '.join(missing)} not" if missing else "no generated model to evaluate"
        raise ConfigError(f"{asked} in {layout.root} (it has: {have})")
    samples = eval_contexts(config)
    _start_from_run_responses(layout.responses_file, out.responses_file)
    generate_responses(
        config.model,
        config.generation,
        config.data.system_prompt,
        samples,
        adapters,
        out.responses_file,
        seed=config.run.seed,
        evolve=config.evolve,
    )
    table = read_eval_table(out.responses_file, samples, list(adapters), include_human=HUMAN in wanted)
    result = score_table(table, config, out.eval_dir)
    reflections = iteration_reflections(layout, config)
    extra = {"run": str(layout.root), "responses_file": str(out.responses_file), **(provenance or {})}
    paths = write_report(result, table, out.report_dir, extra, reflections=reflections)
    log.info("evaluation report: %s", paths["html"])
    return {"contexts": len(table), "models": table.models, "report": str(paths["html"]), "notes": result.notes}


def _exists(layout: RunLayout, name: str) -> bool:
    try:
        present = layout.has_model(name)
    except ValueError:
        present = False
    if not present:
        log.info("evaluation: model %s not in %s, left out", name, layout.root)
    return present


def eval_contexts(config: ExperimentConfig) -> list[TurnSample]:
    """A seeded sample of `eval.max_contexts` turn-level contexts of the eval split (all when unset)."""
    source = config.eval.split_path or config.data.valid_path
    if source is None:
        raise ConfigError("evaluation needs eval.split_path or data.valid_path")
    samples = load_split(source, config.data).samples
    if config.eval.max_contexts and len(samples) > config.eval.max_contexts:
        seed = config.run.seed if config.eval.context_seed is None else config.eval.context_seed
        samples = random.Random(seed).sample(samples, config.eval.max_contexts)
    return samples


def generate_responses(
    model: ModelSettings,
    generation: GenerationSettings,
    system_prompt: str | None,
    samples: list[TurnSample],
    adapters: dict[str, Path | None],
    out: Path,
    *,
    seed: int,
    evolve: EvolveSettings | None = None,
) -> None:
    """Append each model's responses to `out`, skipping models already complete there. An `mK+refine` model
    answers through draft, reflection and refinement with `evolve`'s settings. Each model's generation time goes
    to `generation_time.json` beside `out`."""
    from esc_evolve.generation import GenerationRequest, build_generator

    ids = {s.sample_id for s in samples}
    done = _complete_models(out, ids)
    requests = [GenerationRequest(messages=build_messages(s.context, system_prompt), id=s.sample_id) for s in samples]
    for name, adapter in adapters.items():
        if name in done:
            log.info("evaluation: responses of %s already generated", name)
            continue
        log.info("evaluation: generating %d responses with %s", len(samples), name)
        started = time.perf_counter()
        with build_generator(model, generation, adapter, seed=seed) as generator:
            if refines_at_inference(name):
                rows = refined_rows(evolve or EvolveSettings(), generator, samples, name, system_prompt, seed)
            else:
                results = generator.generate(requests)
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
        record_generation_time(out.parent / GENERATION_TIME_FILE, name, len(samples), time.perf_counter() - started)
        # A model that answered some of these contexts before (another --max-contexts) is replaced on them,
        # so that no (context, model) pair is written twice.
        previous = [r for r in read_rows(out) if r.model != name or r.sample_id not in ids] if out.is_file() else []
        write_responses(out, [*previous, *rows])  # atomic: a kill mid-write keeps the previous models


def refined_rows(
    evolve: EvolveSettings,
    generator: Any,
    samples: list[TurnSample],
    name: str,
    system_prompt: str | None,
    seed: int,
) -> list[ResponseRow]:
    """The replies of `mK+refine`: y' of draft -> reflect -> refine, with the reflection (scored by the reflection
    metric) and the draft kept in the row."""
    from esc_evolve.evolve.loop import answer_with_refinement

    done = answer_with_refinement(evolve, samples, generator, seed=seed, system_prompt=system_prompt)
    return [
        ResponseRow(
            sample_id=d.sample.sample_id,
            model=name,
            response=d.refined.text.strip(),
            reflection=eval_reflection(d.reflection.to_dict().get("fields", {})),
            sample=d.sample,
            meta={"finish_reason": d.refined.finish_reason, "tokens": d.refined.num_tokens, "draft": d.draft.text},
        )
        for d in done
    ]


GENERATION_TIME_FILE = "generation_time.json"  # beside responses.jsonl (RunLayout.generation_time_file)


def record_generation_time(path: Path, model: str, replies: int, seconds: float) -> None:
    """Wall time of one model's replies (loading included), so that answering with refinement can be priced
    against answering directly. Kept out of responses.jsonl: rerunning the same config writes the same rows."""
    times = read_json(path) or {}
    times[model] = {"replies": replies, "seconds": round(seconds, 3), "seconds_per_reply": round(seconds / replies, 4)}
    write_json_atomic(path, times)


def read_eval_table(path: Path, samples: list[TurnSample], models: list[str], include_human: bool) -> ResponsesTable:
    """The rows of `path` for these contexts and models: the file may also hold other splits or models."""
    ids = {s.sample_id for s in samples}
    rows = [r for r in read_rows(path) if r.sample_id in ids and r.model in models]
    return build_table(rows, samples_by_id(samples), include_human=include_human, models=models)


def score_table(table: ResponsesTable, config: ExperimentConfig, records_dir: Path | None) -> EvalResult:
    """`evaluate` with the config's settings and its judge (built only when the judge metric runs)."""
    from esc_evolve.evaluation import EvaluationSettings, build_judge, evaluate

    settings = EvaluationSettings.for_experiment(config)
    judge = None
    if "judge" in settings.metrics:
        judge = build_judge(config.eval.judge, config.model, config.generation, seed=config.run.seed)
    try:
        return evaluate(table, settings, judge=judge, out_dir=records_dir)
    finally:
        if judge is not None:
            judge.close()  # a local judge holds a model in memory


def iteration_reflections(layout: RunLayout, config: ExperimentConfig) -> dict[str, EvalResult]:
    """For each iteration with pairs, the reflection metric of what M_{t-1} inferred on its training contexts."""
    from esc_evolve.evaluation import EvaluationSettings, evaluate
    from esc_evolve.evolve.pairs import PairStore

    found = [t for t in layout.iterations() if layout.pairs_file(t).is_file()]
    if not found or "reflection" not in config.eval.metrics:  # part of the reflection metric, chosen like it
        return {}
    settings = EvaluationSettings.for_experiment(config).model_copy(update={"metrics": ["reflection"]})
    train = load_train(config.data).by_id()
    results = {}
    for t in found:
        records = [r for r in PairStore(layout.pairs_file(t)).read() if r.sample_id in train]
        if not records:
            continue
        model = f"m{t - 1}"
        rows = [reflection_row(r, model) for r in records]
        table = build_table(rows, {r.sample_id: train[r.sample_id] for r in records}, include_human=False)
        results[f"iter{t}: {model} on {len(records)} training contexts"] = evaluate(table, settings)
    return results


def reflection_row(record: PairRecord, model: str) -> ResponseRow:
    """A pair record as evaluation sees a reflection: the inferred emotion, and the situation sentence, which
    names the problem (matched against the gold problem type) and the situation itself."""
    reflection = eval_reflection(record.reflection.get("fields", {}))
    return ResponseRow(sample_id=record.sample_id, model=model, response=record.rejected, reflection=reflection)


def eval_reflection(fields: dict[str, Any]) -> Reflection | None:
    """The parsed fields of an evolve reflection (`Reflection.to_dict()["fields"]`) as evaluation reads them; None
    when no field was asked (self-refinement alone, evolve.reflection: none)."""
    if not fields:
        return None

    def value(name: str) -> str | None:
        parse = fields.get(name) or {}
        return parse.get("value") if parse.get("status") == "ok" else None

    parsed = {name: value(name) for name in fields}
    text = "; ".join(f"{name}: {v}" for name, v in parsed.items() if v)
    situation = value("situation")  # it names the problem too: matched against the gold problem type
    return Reflection(emotion=value("emotion"), problem=situation, situation=situation, text=text or None)


def load_run_config(run_path: Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The config a run was made with (`RUN/config.yaml`) plus `eval.KEY=VALUE` overrides.

    Only the eval section may change: responses already generated stay valid only for the same models, data and
    decoding settings."""
    from esc_evolve.config import load_config

    saved = RunLayout(run_path).config_file
    if not saved.is_file():
        what = "does not exist" if not run_path.exists() else "is not a run directory (no config.yaml)"
        raise ConfigError(f"{run_path} {what}: give a folder written by `esc-evolve run`, e.g. runs/quickstart")
    others = [o for o in overrides or [] if not o.strip().startswith("eval.")]
    if others:
        raise ConfigError(f"only eval.KEY=VALUE overrides apply to an existing run, got: {', '.join(others)}")
    return load_config(saved, overrides)


def _start_from_run_responses(run_responses: Path, responses: Path) -> None:
    """A new output folder starts from the run's own responses, so that re-scoring elsewhere (another judge,
    other metrics) generates nothing that the run already has; other contexts or models are generated."""
    if responses.is_file() or not run_responses.is_file() or responses.resolve() == run_responses.resolve():
        return
    responses.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_responses, responses)


def _complete_models(path: Path, sample_ids: set[str]) -> set[str]:
    if not path.is_file():
        return set()
    answered: dict[str, set[str]] = {}
    for row in read_rows(path):
        answered.setdefault(row.model, set()).add(row.sample_id)
    return {model for model, ids in answered.items() if sample_ids <= ids}
