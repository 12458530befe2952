"""Reflection accuracy of M_t on N training contexts: emotion and problem match vs gold, generic situations.

M_t (`--model`: a LoRA folder such as runs/esconv-cpu/m0; its run's config.yaml is used unless `--config` says
otherwise) answers N contexts of the *training* data as `esc-evolve pairs` does: the contexts iteration
`--iteration` selects (`evolve.loop.select_contexts`), the draft y, the probes, then every reflection field with
the configured self-consistency, exemplars and checks (`evolve.loop._reflect`). Nothing here reads an evaluation
split. Printed and stored in benchmarks/results/reflection_quality.json (aggregates only; ESConv is CC BY-NC and
its text never enters the repository):

- parse rate, per field status counts, the share of generic answers per checked field (situation, profile,
  critique), and the share of answers said near-verbatim to 3 or more other contexts (`recurrence`);
- emotion_match / problem_match: the parsed emotion names the gold emotion type, the situation names the gold
  problem type (as evaluation's reflection metric), of parsed answers and of all contexts (`_all`), next to the
  share of the most common gold emotion (what always answering it would score);
- situation grounding, both ways, whatever `evolve.situation_grounding` selects: the lexical verdict and the
  packaged MiniLM cosine of each parsed-or-generic situation with its closest seeker turn (to set
  `grounding_min_similarity`);
- with `--pairs`, the refinement and the pair filters too: pairs kept, drop reasons, how often y' used the
  reflection.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reflection_quality.py --model runs/esconv-cpu/m0 --contexts 64
    ... --baseline             # the reflection as before (k=1, no exemplars, no grounding, no probes)
    ... --set evolve.reflection_samples=3 --label k3
    ... --pairs                # also refine and filter (slower: one more generation per context)

`--set` takes `evolve.KEY=VALUE` (or any config key) overrides; `--raw-out FILE` (outside the repository)
keeps every context's draft, reflection and gold labels as JSON lines for a closer look.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from esc_evolve.config import ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "reflection_quality.json"
BASELINE = [
    "evolve.reflection_samples=1",
    "evolve.reflection_exemplars=0",
    "evolve.situation_grounding=off",
    "evolve.generic_probes=0",
]
ABOUT = (
    "Reflection accuracy of M_t on training contexts (benchmarks/reflection_quality.py): the reflection fields as "
    "`esc-evolve pairs` generates them under the entry's evolve settings; emotion/problem match against the gold "
    "profile (evaluation's matching rule), generic and recurring answers, the MiniLM cosine of situations with the "
    "seeker's turns; with --pairs the pair filters' counts. Aggregates only: no dialogue text is stored."
)


def main() -> None:
    args = parse_args()
    config = experiment_config(args)
    contexts = training_contexts(config, args)
    start = time.perf_counter()
    if args.pairs:
        rows, pairs = with_pairs(config, args, contexts)
    else:
        rows, pairs = reflections_only(config, args, contexts), None
    seconds = time.perf_counter() - start
    entry = summarise(rows, config)
    if pairs is not None:
        entry["pairs"] = pairs
    entry.update(
        model=str(args.model),
        data=config.data.train_path,
        contexts=len(rows),
        seconds=round(seconds, 1),
        seconds_per_context=round(seconds / max(len(rows), 1), 2),
        evolve={k: v for k, v in config.evolve.model_dump().items() if k != "filters"},
        filters=config.evolve.filters.model_dump(),
    )
    if args.raw_out:
        write_raw(args.raw_out, rows)
    key = f"{args.model} | {config.data.train_path} | {len(rows)} contexts from {args.start}"
    key += f" | {args.label or ('baseline' if args.baseline else 'settings')}"
    store(key, entry)
    print(json.dumps({key: entry}, indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="M_t's LoRA folder (e.g. runs/esconv-cpu/m0).")
    parser.add_argument("--config", type=Path, help="Experiment config (default: the model's run's config.yaml).")
    parser.add_argument("--data", help="Training data (default: the config's data.train_path).")
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--start", type=int, default=0, help="Skip this many of the selected contexts.")
    parser.add_argument("--iteration", type=int, default=1, help="Whose contexts (select_contexts).")
    parser.add_argument("--set", action="append", default=[], help="Config override KEY=VALUE (repeatable).")
    parser.add_argument("--baseline", action="store_true", help="The reflection before self-consistency/checks.")
    parser.add_argument("--pairs", action="store_true", help="Also refine and filter: pair statistics.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default).")
    parser.add_argument("--raw-out", type=Path, help="Per-context JSON lines (outside the repository).")
    parser.add_argument("--label", default="", help="Name of the entry (default: 'baseline' or 'settings').")
    args = parser.parse_args()
    if args.raw_out and args.raw_out.resolve().is_relative_to(ROOT):
        parser.error("--raw-out holds dialogue text: write it outside the repository (e.g. /tmp)")
    return args


def experiment_config(args: argparse.Namespace) -> ExperimentConfig:
    run_config = args.model.parent / "config.yaml"
    path = args.config or (run_config if run_config.is_file() else None)
    overrides = [*(BASELINE if args.baseline else []), *args.set]
    if args.data:
        overrides.append(f"data.train_path={args.data}")
    overrides.append(f"evolve.contexts_per_iteration={args.start + args.contexts}")
    config = load_config(path, overrides)
    if any(word in Path(config.data.train_path).name.lower() for word in ("valid", "test")):
        raise SystemExit(f"{config.data.train_path}: measure on training contexts, never an evaluation split")
    return config


def training_contexts(config: ExperimentConfig, args: argparse.Namespace) -> list[Any]:
    from esc_evolve.data import load_train
    from esc_evolve.evolve.loop import select_contexts

    samples = load_train(config.data).samples
    return select_contexts(samples, config.evolve, config.run.seed, args.iteration)[args.start :]


def generator_for(config: ExperimentConfig, args: argparse.Namespace) -> Any:
    import torch

    from esc_evolve.generation import build_generator

    if args.threads:
        torch.set_num_threads(args.threads)
    return build_generator(config.model, config.generation, args.model, seed=config.run.seed + args.iteration)


def reflections_only(config: ExperimentConfig, args: argparse.Namespace, contexts: list[Any]) -> list[dict[str, Any]]:
    """Drafts and reflections as `generate_pairs` makes them (same job, probes, requests), without refinement."""
    from esc_evolve.data.prompts import build_messages
    from esc_evolve.evolve.loop import _reflect, draft_request, pair_job, with_probes

    rows: list[dict[str, Any]] = []
    with generator_for(config, args) as generator:
        job = pair_job(config.evolve, generator, args.iteration, config.run.seed, config.data.system_prompt)
        job = with_probes(job, generator)
        size = config.generation.batch_size
        for first in range(0, len(contexts), size):
            chunk = contexts[first : first + size]
            prompts = [build_messages(s.context, job.system_prompt) for s in chunk]
            drafts = generator.generate(
                [draft_request(p, s, job.seed + job.iteration) for p, s in zip(prompts, chunk, strict=True)],
                progress=False,
            )
            reflections = _reflect(generator, job, chunk, [d.text for d in drafts])
            rows += [row(s, d.text, r.to_dict()) for s, d, r in zip(chunk, drafts, reflections, strict=True)]
            print(f"{len(rows)}/{len(contexts)} contexts", flush=True)
    return rows


def with_pairs(
    config: ExperimentConfig, args: argparse.Namespace, contexts: list[Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The whole iteration's pair generation into a temporary file; its records and `pair_statistics`."""
    from esc_evolve.evolve.loop import generate_pairs, pair_statistics
    from esc_evolve.evolve.pairs import PairStore

    by_id = {s.sample_id: s for s in contexts}
    with tempfile.TemporaryDirectory() as tmp, generator_for(config, args) as generator:
        file = Path(tmp) / "pairs.jsonl"
        generate_pairs(
            config.evolve,
            contexts,
            generator,
            file,
            iteration=args.iteration,
            seed=config.run.seed,
            system_prompt=config.data.system_prompt,
            chunk_size=config.generation.batch_size,
        )
        records = list(PairStore(file).read())
    rows = [row(by_id[r.sample_id], r.rejected, r.reflection, r) for r in records]
    stats = pair_statistics(records)
    return rows, {k: stats[k] for k in ("kept", "dropped", "dropped_by_reason", "kept_pairs", "checks")}


def row(sample: Any, draft: str, reflection: dict[str, Any], record: Any = None) -> dict[str, Any]:
    out = {
        "sample_id": sample.sample_id,
        "seeker": [t.text for t in sample.context if t.speaker == "seeker"],
        "draft": draft,
        "reflection": reflection,
        "gold": {"emotion_type": sample.profile.emotion_type, "problem_type": sample.profile.problem_type},
    }
    if record is not None:
        out.update(chosen=record.chosen, keep=record.keep, reasons=record.reasons, checks=record.checks)
    return out


def summarise(rows: list[dict[str, Any]], config: ExperimentConfig) -> dict[str, Any]:
    from esc_evolve.evolve.quality import quality_of

    entry = quality_of([r["reflection"] for r in rows], [r["gold"] for r in rows])
    entry["fields"] = {
        name: dict(Counter(r["reflection"]["fields"][name]["status"] for r in rows))
        for name in (rows[0]["reflection"].get("fields", {}) if rows else {})
    }
    gold = [r["gold"]["emotion_type"] for r in rows if r["gold"]["emotion_type"]]
    if gold:
        label, count = Counter(gold).most_common(1)[0]
        entry["majority_gold_emotion"] = {"label": label, "share": round(count / len(gold), 4)}
    entry["predicted_emotions"] = dict(Counter(_value(r, "emotion") or "-" for r in rows).most_common())
    entry["situation_grounding"] = grounding_both_ways(rows, config)
    return entry


def grounding_both_ways(rows: list[dict[str, Any]], config: ExperimentConfig) -> dict[str, Any]:
    """For every situation that parsed (ok or generic): the lexical verdict and the MiniLM cosine with the closest
    seeker turn, so the embedding threshold can be set against the lexical check."""
    from esc_evolve.evolve.grounding import Grounder, lexical_grounding
    from esc_evolve.evolve.reflection import parse_field

    embedding = Grounder("embedding", min_similarity=config.evolve.grounding_min_similarity)
    principles_field = _situation_field(config)
    lexical, cosines = [], []
    for r in rows:
        situation = r["reflection"].get("fields", {}).get("situation")
        if not situation or situation["status"] not in ("ok", "generic"):
            continue
        text = situation["value"] or parse_field(principles_field, situation["raw"]).value or ""
        lexical.append(lexical_grounding(text, r["seeker"], config.evolve.grounding_min_terms).grounded)
        cosines.append(embedding.check(text, r["seeker"]).similarity or 0.0)
    grounded = [c for c, ok in zip(cosines, lexical, strict=True) if ok]
    generic = [c for c, ok in zip(cosines, lexical, strict=True) if not ok]
    threshold = config.evolve.grounding_min_similarity
    return {
        "situations": len(lexical),
        "lexically_grounded_share": round(sum(lexical) / len(lexical), 4) if lexical else None,
        "mean_cosine_lexically_grounded": _mean(grounded),
        "mean_cosine_lexically_generic": _mean(generic),
        f"embedding_grounded_share_at_{threshold}": round(sum(c >= threshold for c in cosines) / len(cosines), 4)
        if cosines
        else None,
        "verdicts_agree": _mean([float((c >= threshold) == ok) for c, ok in zip(cosines, lexical, strict=True)]),
    }


def _situation_field(config: ExperimentConfig) -> Any:
    from esc_evolve.evolve.principles import load_principles

    return load_principles(config.evolve.principles_path).field("situation")


def _value(row: dict[str, Any], name: str) -> str | None:
    parse = row["reflection"].get("fields", {}).get(name) or {}
    return parse.get("value") if parse.get("status") == "ok" else None


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def write_raw(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def store(key: str, entry: dict[str, Any]) -> None:
    results = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.is_file() else {}
    results["about"] = ABOUT
    results["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    results.setdefault("runs", {})[key] = entry
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
