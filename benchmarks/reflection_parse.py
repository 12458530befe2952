"""Reflection parse rate of M_t under a principles file: per-field statuses, parsed share, emotion vs gold.

For N contexts (the pipeline's own selection: `evolve.loop.select_contexts` with `data.train_path` set to
`--data`, iteration `--iteration`), M_t (default: the quickstart's M0 adapter on the default backbone) writes
its draft y and then every reflection field, exactly as `esc-evolve evolve` does: the same messages, the same
fixed prefixes, greedy, one batched call per chunk of `generation.batch_size` contexts (`evolve.loop._reflect`).
The refinement y' is not generated: it does not change whether the reflection parsed.

Printed and written to benchmarks/results/reflection_parse.json (one entry per data source x principles x
parser, replaced when re-measured): status counts per field, the parse rate (every required field "ok"), and
where the data carries gold emotions (ESConv's `emotion_type`) how often the parsed emotion equals the gold
one, next to the share of the most common gold label (what always answering it would score).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reflection_parse.py                        # builtin:train, 24
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reflection_parse.py --principles git:52ed062  # v1 principles
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reflection_parse.py \
        --data ../shared/data/esconv/train.jsonl --contexts 48 --start 0 --raw-out /tmp/raw.jsonl
    .venv/bin/python benchmarks/reflection_parse.py --reparse /tmp/raw.jsonl  # no model: parse stored raws again

`--principles` takes `packaged` (default), a YAML path, or `git:REV` (the packaged file at that git revision,
e.g. the version-1 principles). `--raw-out` keeps every raw field text (JSON lines) so that a parser change can
be measured on the same generations with `--reparse`, without the model. Long runs can be split with `--start`
and `--contexts` (a slice of the selection); `--merge` adds a slice to the stored entry instead of replacing it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from esc_evolve.config import ExperimentConfig, load_config
from esc_evolve.evolve.principles import Principles, load_principles
from esc_evolve.evolve.reflection import build_reflection

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "reflection_parse.json"
QUICKSTART = ROOT / "runs" / "quickstart"
PACKAGED_PATH = "src/esc_evolve/evolve/principles.yaml"
STATUSES = ("ok", "empty", "no_label", "degenerate")
ABOUT = (
    "Reflection parse rate of M_t (default: runs/quickstart/m0), greedy, as `esc-evolve evolve` generates the "
    "draft and the reflection fields; written by benchmarks/reflection_parse.py. One entry per data source x "
    "principles x parser: `parser <commit>` is the parser code (reflection.py, text.py, data/vocabulary) at "
    "that commit, `+modified` the working tree at the time. Entries labelled `re-parsed` parse stored raw "
    "generations again without the model (the generations "
    "of the entry with the same data and the version-1 principles). Per field: counts of each parse status; "
    "emotion_vs_gold compares the parsed emotion with the data's gold emotion_type. Generated on CPU, fp32, "
    "torch threads as `torch_threads` (the --threads default, 1, where absent)."
)


def main() -> None:
    args = parse_args()
    principles = resolve_principles(args.principles)
    if args.reparse:
        rows = [json.loads(line) for line in args.reparse.open(encoding="utf-8") if line.strip()]
        data, seconds = rows[0]["data"] if rows else "?", 0.0
    else:
        rows, seconds = generate(args, principles)
        data = args.data
        if args.raw_out:
            args.raw_out.parent.mkdir(parents=True, exist_ok=True)
            with args.raw_out.open("a" if args.merge else "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps({**r, "data": data}) + "\n" for r in rows)
    entry = summarise(rows, principles)
    entry.update(
        data=data,
        principles=args.principles,
        principles_version=principles.version,
        parser=parser_state(),
        adapter=str(args.adapter) if not args.reparse else "(reparsed raws)",
        seconds=round(seconds, 1),
    )
    if not args.reparse:
        entry["torch_threads"] = torch_threads()
    key = f"{data} | principles {args.principles} (v{principles.version}) | parser {entry['parser']}"
    if args.label:
        key += f" | {args.label}"
    store(key, entry, merge=args.merge)
    print_entry(key, entry)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="builtin:train", help="data.train_path of the contexts.")
    parser.add_argument("--contexts", type=int, default=24)
    parser.add_argument("--start", type=int, default=0, help="Skip this many of the selected contexts.")
    parser.add_argument("--iteration", type=int, default=1, help="Whose contexts (select_contexts).")
    parser.add_argument("--principles", default="packaged", help="packaged | PATH | git:REV")
    parser.add_argument(
        "--config",
        type=Path,
        default=QUICKSTART / "config.yaml" if (QUICKSTART / "config.yaml").is_file() else None,
        help="Experiment config (default: the quickstart's, else the defaults).",
    )
    parser.add_argument("--adapter", type=Path, default=QUICKSTART / "m0", help="M_t's LoRA folder ('' = none).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default).")
    parser.add_argument("--raw-out", type=Path, help="Also write every raw field text here (JSON lines).")
    parser.add_argument("--reparse", type=Path, help="Parse a --raw-out file again instead of generating.")
    parser.add_argument("--merge", action="store_true", help="Add to the stored entry (a further slice).")
    parser.add_argument("--label", default="", help="Extra text for the entry's key.")
    return parser.parse_args()


def resolve_principles(spec: str) -> Principles:
    if spec == "packaged":
        return load_principles()
    if spec.startswith("git:"):
        text = subprocess.run(
            ["git", "show", f"{spec[4:]}:{PACKAGED_PATH}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        return Principles.model_validate(yaml.safe_load(text))
    return load_principles(spec)


def experiment_config(args: argparse.Namespace) -> ExperimentConfig:
    config = load_config(args.config)
    evolve = config.evolve.model_copy(update={"contexts_per_iteration": args.start + args.contexts})
    data = config.data.model_copy(update={"train_path": args.data})
    return config.model_copy(update={"evolve": evolve, "data": data})


def generate(args: argparse.Namespace, principles: Principles) -> tuple[list[dict[str, Any]], float]:
    """Draft and reflection fields of each context, as `generate_pairs` makes them (refinement left out)."""
    import torch

    from esc_evolve.data import load_train
    from esc_evolve.data.prompts import build_messages
    from esc_evolve.evolve.loop import PairJob, _reflect, select_contexts
    from esc_evolve.generation import GenerationRequest, build_generator
    from esc_evolve.models import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    config = experiment_config(args)
    samples = load_train(config.data).samples
    contexts = select_contexts(samples, config.evolve, config.run.seed, args.iteration)[args.start :]
    adapter = args.adapter if str(args.adapter) not in ("", ".") else None
    rows: list[dict[str, Any]] = []
    with build_generator(config.model, config.generation, adapter, seed=config.run.seed) as generator:
        if generator.tokenizer is None:  # a server: reflection prompts go to it as token ids of the model's tokenizer
            generator.tokenizer = load_tokenizer(config.model, adapter)
        job = PairJob(
            config.evolve, args.iteration, config.run.seed, config.data.system_prompt, principles, generator.tokenizer
        )
        start = time.perf_counter()
        size = config.generation.batch_size
        for first in range(0, len(contexts), size):
            chunk = contexts[first : first + size]
            drafts = generator.generate(
                [
                    GenerationRequest(messages=build_messages(s.context, config.data.system_prompt), id=s.sample_id)
                    for s in chunk
                ],
                progress=False,
            )
            texts = [d.text for d in drafts]
            reflections = _reflect(generator, job, chunk, texts)
            for sample, draft, reflection in zip(chunk, texts, reflections, strict=True):
                rows.append(
                    {
                        "sample_id": sample.sample_id,
                        "gold_emotion": sample.profile.emotion_type,
                        "draft": draft,
                        "raw": {name: parse.raw for name, parse in reflection.fields.items()},
                    }
                )
            print(f"{len(rows)}/{len(contexts)} contexts, {time.perf_counter() - start:.0f} s", flush=True)
    return rows, time.perf_counter() - start


def summarise(rows: list[dict[str, Any]], principles: Principles) -> dict[str, Any]:
    names = [f.name for f in principles.reflection_fields]
    counts: dict[str, Counter[str]] = {name: Counter() for name in names}
    failures: dict[str, list[str]] = {name: [] for name in names}
    parsed = 0
    emotions: list[tuple[str | None, str | None]] = []
    for row in rows:
        reflection = build_reflection(principles, row["raw"])
        parsed += reflection.parsed
        for name in names:
            parse = reflection.fields[name]
            counts[name][parse.status] += 1
            if parse.status != "ok" and len(failures[name]) < 6:
                failures[name].append(f"{parse.status}: {parse.raw!r}")
        emotions.append((row.get("gold_emotion"), reflection.value("emotion")))
    total = len(rows)
    entry: dict[str, Any] = {
        "contexts": total,
        "parse_rate": round(parsed / total, 4) if total else 0.0,
        "parsed": parsed,
        "fields": {
            name: {
                "required": principles.field(name).required,
                **{s: counts[name][s] for s in STATUSES},
            }
            for name in names
        },
        "failures": {name: examples for name, examples in failures.items() if examples},
    }
    gold = [(g, p) for g, p in emotions if g]
    if gold and "emotion" in names:
        labels = set(principles.field("emotion").options or {})
        majority, majority_n = Counter(g for g, _ in gold).most_common(1)[0]
        entry["emotion_vs_gold"] = {
            "with_gold": len(gold),
            "gold_label_in_options": sum(g in labels for g, _ in gold),
            "parsed": sum(p is not None for _, p in gold),
            "match": sum(g == p for g, p in gold),
            "accuracy_of_all": round(sum(g == p for g, p in gold) / len(gold), 4),
            "accuracy_of_parsed": round(sum(g == p for g, p in gold) / max(1, sum(p is not None for _, p in gold)), 4),
            "majority_gold": majority,
            "majority_share": round(majority_n / len(gold), 4),
            "predicted": dict(Counter(p or "-" for _, p in gold).most_common()),
            "gold": dict(Counter(g for g, _ in gold).most_common()),
        }
    return entry


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def parser_state() -> str:
    """The commit of the parser code, marked `+modified` when any file the parser reads differs from it."""

    def git(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False)

    commit = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
    parser_files = [
        f"src/esc_evolve/{p}" for p in ("evolve/reflection.py", "text.py", "data/vocabulary.py", "data/vocabulary.yaml")
    ]
    dirty = git("diff", "--quiet", "HEAD", "--", *parser_files).returncode != 0
    return commit + ("+modified" if dirty else "")


def store(key: str, entry: dict[str, Any], merge: bool) -> None:
    results = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.is_file() else {}
    results["about"] = ABOUT
    results["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
    runs = results.setdefault("runs", {})
    if merge and key in runs:
        entry = merge_entries(runs[key], entry)
    runs[key] = entry
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def merge_entries(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Counts of two slices of the same measurement, added (emotion accuracy recomputed)."""
    out = dict(new)
    out["contexts"] = old["contexts"] + new["contexts"]
    out["parsed"] = old["parsed"] + new["parsed"]
    out["parse_rate"] = round(out["parsed"] / out["contexts"], 4)
    out["seconds"] = round(old.get("seconds", 0) + new.get("seconds", 0), 1)
    out["fields"] = {
        name: {
            k: (v + old["fields"][name][k]) if isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in counts.items()
        }
        for name, counts in new["fields"].items()
    }
    out["failures"] = {
        name: (old.get("failures", {}).get(name, []) + new.get("failures", {}).get(name, []))[:6]
        for name in set(old.get("failures", {})) | set(new.get("failures", {}))
    }
    if "emotion_vs_gold" in old and "emotion_vs_gold" in new:
        a, b = old["emotion_vs_gold"], new["emotion_vs_gold"]
        e = {k: a[k] + b[k] for k in ("with_gold", "gold_label_in_options", "parsed", "match")}
        e["accuracy_of_all"] = round(e["match"] / e["with_gold"], 4)
        e["accuracy_of_parsed"] = round(e["match"] / max(1, e["parsed"]), 4)
        e["predicted"] = dict((Counter(a["predicted"]) + Counter(b["predicted"])).most_common())
        e["gold"] = dict((Counter(a["gold"]) + Counter(b["gold"])).most_common())
        e["majority_gold"], majority_n = next(iter(e["gold"].items()))
        e["majority_share"] = round(majority_n / e["with_gold"], 4)
        out["emotion_vs_gold"] = e
    return out


def print_entry(key: str, entry: dict[str, Any]) -> None:
    print(f"\n{key}: {entry['contexts']} contexts, {entry['seconds']} s")
    print(f"{'field':10s} {'req':>4s} " + " ".join(f"{s:>10s}" for s in STATUSES))
    for name, counts in entry["fields"].items():
        req = "yes" if counts["required"] else "no"
        print(f"{name:10s} {req:>4s} " + " ".join(f"{counts[s]:>10d}" for s in STATUSES))
    for name, examples in entry["failures"].items():
        for example in examples[:3]:
            print(f"  {name}: {example}")
    if "emotion_vs_gold" in entry:
        e = entry["emotion_vs_gold"]
        print(
            f"emotion vs gold: {e['match']}/{e['with_gold']} match ({e['accuracy_of_all']:.1%}; "
            f"{e['accuracy_of_parsed']:.1%} of parsed), always '{e['majority_gold']}' would score "
            f"{e['majority_share']:.1%}; predicted {e['predicted']}"
        )
    print(f"parse_rate={entry['parse_rate']:.3f}")


if __name__ == "__main__":
    main()
