"""Risk detector on the project's own labelled set and on ESConv valid: recall, false alarms, flag rate, latency.

    .venv/bin/python benchmarks/safety.py                       # ~1 min once the detector is trained and cached
    .venv/bin/python benchmarks/safety.py --choose-thresholds   # + a fine-tune on 80% of train (~3 min)

1. With --choose-thresholds: the classifier fine-tuned on 80% of the TRAIN split, a threshold sweep on the other
   20%. This is where the thresholds of `esc_evolve.safety.detector` are chosen (never on the test split).
2. The packaged detector (fine-tuned on the whole train split) on the TEST split: recall on at-risk messages, on
   urgent ones, per category and per form; false alarms on the hard negatives; the same without the rule floor
   and without sentence windows, to show what each part adds.
3. The share of ESConv valid seeker turns flagged (each with the previous seeker turn as history), and every
   flagged turn listed so that a reader can judge them.
4. Latency of one `assess` call per message (after a warm-up), torch's default threads.

Results: benchmarks/results/safety.json and safety_flagged_esconv.md (turn positions; the texts go to the
local, git-ignored safety_flagged_esconv_text.md); the output ends with the goal lines
`recall_urgent=`, `recall_any=`, `false_alarm_hard_negatives=`, `flag_rate_esconv_valid=`, `latency_ms_mean=`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from esc_evolve.data.loaders import load_conversations
from esc_evolve.safety import detector as detector_module
from esc_evolve.safety.dataset import esconv_negatives, load_risk_examples
from esc_evolve.safety.detector import RiskDetector, default_detector
from esc_evolve.safety.model import fine_tune

RESULTS = Path(__file__).parent / "results"
DEFAULT_ESCONV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "esconv" / "valid.jsonl"
SWEEP = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def choose_thresholds(train) -> dict:
    """Fine-tune on 80% of train (stratified by level), sweep the at-risk threshold on the other 20%."""
    from esc_evolve.evaluation.embedding import packaged_model_dir

    rng = np.random.default_rng(0)
    dev_ids = set()
    for level in ("none", "concern", "urgent"):
        ids = [e.id for e in train if e.level == level]
        dev_ids |= set(rng.permutation(ids)[: len(ids) // 5].tolist())
    fit = [e for e in train if e.id not in dev_ids]
    dev = [e for e in train if e.id in dev_ids]
    esconv_train = detector_module.esconv_train_file()
    if esconv_train:  # the same extra negatives as the packaged detector (ESConv train, never valid)
        fit += esconv_negatives(esconv_train, detector_module.ESCONV_NEGATIVES)
    model = fine_tune(packaged_model_dir(), fit)
    return {
        str(t): scores(dev, RiskDetector(model, at_risk_threshold=t).assess_many([e.text for e in dev])) for t in SWEEP
    }


def scores(examples, assessments) -> dict:
    pairs = list(zip(examples, assessments, strict=True))
    risky = [(e, a) for e, a in pairs if e.at_risk]
    urgent = [(e, a) for e, a in risky if e.level == "urgent"]
    hard = [(e, a) for e, a in pairs if not e.at_risk and e.categories != ("ordinary_chat",)]
    chat = [(e, a) for e, a in pairs if e.categories == ("ordinary_chat",)]
    return {
        "recall_any": _share(a.at_risk for _, a in risky),
        "recall_urgent": _share(a.level == "urgent" for _, a in urgent),
        "urgent_flagged_any": _share(a.at_risk for _, a in urgent),
        "false_alarm_hard_negatives": _share(a.at_risk for _, a in hard),
        "false_alarm_ordinary_chat": _share(a.at_risk for _, a in chat),
        "n_at_risk": len(risky),
        "n_urgent": len(urgent),
        "n_hard_negatives": len(hard),
        "n_ordinary_chat": len(chat),
    }


def breakdown(examples, assessments, key) -> dict:
    groups = defaultdict(list)
    for e, a in zip(examples, assessments, strict=True):
        groups[key(e)].append(a.at_risk)
    return {name: {"flagged": _share(v), "n": len(v)} for name, v in sorted(groups.items())}


def esconv_turns(path: Path) -> tuple[list[str], list[list[str]], list[str]]:
    texts, histories, where = [], [], []
    for conv in load_conversations(path).conversations:
        seen: list[str] = []
        for index, turn in enumerate(conv.turns):
            if turn.speaker == "seeker":
                texts.append(turn.text)
                histories.append(seen[-1:])
                where.append(f"{conv.id} turn {index}")
                seen.append(turn.text)
    return texts, histories, where


def ablations(detector: RiskDetector, test) -> dict:
    """What the rule floor and the sentence windows each add (same model, one part switched off)."""
    texts = [e.text for e in test]
    with mock.patch.object(detector_module, "risk_rule_categories", lambda text: []):
        no_rules = scores(test, detector.assess_many(texts))
    with mock.patch.object(detector_module, "MIN_WORDS_TO_SPLIT", 10**9):
        no_windows = scores(test, detector.assess_many(texts))
    return {"without_rule_floor": no_rules, "without_sentence_windows": no_windows}


def write_flagged(flagged: list) -> None:
    """Every flagged ESConv turn: by position in the committed file (ESConv is CC BY-NC and is never committed), and
    with its text in a local file (ignored by git) for a reader who has the data."""
    header = ["| turn | level | score | categories |", "| --- | --- | --- | --- |"]
    rows = [(w, a, f"| {w} | {a.level} | {a.score:.2f} | {', '.join(a.categories)} |") for w, _, a in flagged]
    intro = "# ESConv valid seeker turns the detector flags\n\nThe texts are in safety_flagged_esconv_text.md, written "
    intro += "locally by benchmarks/safety.py (ESConv is not redistributed).\n\n"
    (RESULTS / "safety_flagged_esconv.md").write_text(intro + "\n".join(header + [r for _, _, r in rows]) + "\n")
    with_text = [f"{row} {t.replace('|', '/')} |" for (_, t, _), (_, _, row) in zip(flagged, rows, strict=True)]
    header_text = ["| turn | level | score | categories | text |", "| --- | --- | --- | --- | --- |"]
    (RESULTS / "safety_flagged_esconv_text.md").write_text("\n".join(header_text + with_text) + "\n")


def latency_ms(detector: RiskDetector, texts: list[str]) -> list[float]:
    detector.assess(texts[0])  # warm-up
    out = []
    for text in texts:
        start = time.perf_counter()
        detector.assess(text)
        out.append((time.perf_counter() - start) * 1000)
    return out


def _share(flags) -> float:
    flags = list(flags)
    return round(sum(flags) / len(flags), 4) if flags else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--esconv", type=Path, default=DEFAULT_ESCONV)
    parser.add_argument("--choose-thresholds", action="store_true")
    args = parser.parse_args()
    train, test = load_risk_examples(split="train"), load_risk_examples(split="test")
    result: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "counts": {"train": dict(Counter(e.level for e in train)), "test": dict(Counter(e.level for e in test))},
    }
    if args.choose_thresholds:
        result["threshold_sweep_on_train_dev"] = choose_thresholds(train)
    esconv_train = detector_module.esconv_train_file()
    result["trained_on"] = {
        "labelled_train_split": len(train),
        "esconv_train_negatives": detector_module.ESCONV_NEGATIVES if esconv_train else 0,
        "esconv_train_file": str(esconv_train) if esconv_train else None,
    }
    detector = default_detector()
    result["thresholds"] = {"at_risk": detector.at_risk_threshold, "urgent": detector.urgent_threshold}
    test_assessed = detector.assess_many([e.text for e in test])
    result["test"] = scores(test, test_assessed)
    result["test_ablations"] = ablations(detector, test)
    result["test_by_category"] = breakdown(test, test_assessed, lambda e: e.categories[0] if e.categories else "?")
    result["test_by_form"] = breakdown(test, test_assessed, lambda e: f"{'risk' if e.at_risk else 'negative'}:{e.form}")
    result["test_errors"] = [
        {"id": e.id, "text": e.text, "level": e.level, "got": a.to_dict()}
        for e, a in zip(test, test_assessed, strict=True)
        if e.at_risk != a.at_risk
    ]
    if args.esconv.is_file():
        texts, histories, where = esconv_turns(args.esconv)
        assessed = detector.assess_many(texts, histories)
        flagged = [(w, t, a) for w, t, a in zip(where, texts, assessed, strict=True) if a.at_risk]
        result["esconv_valid"] = {
            "seeker_turns": len(texts),
            "flagged": len(flagged),
            "flag_rate": _share(a.at_risk for a in assessed),
        }
        write_flagged(flagged)
    times = latency_ms(detector, [e.text for e in test[:100]])
    result["latency_ms"] = {
        "mean": round(statistics.mean(times), 2),
        "p95": round(float(np.percentile(times, 95)), 2),
        "torch_threads": torch.get_num_threads(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "safety.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for threshold, row in result.get("threshold_sweep_on_train_dev", {}).items():
        print(f"train-dev threshold={threshold}: {row}")
    print("ablations:", json.dumps(result["test_ablations"]))
    print("by category:", json.dumps(result["test_by_category"]))
    test_scores = result["test"]
    print(f"recall_urgent={test_scores['recall_urgent']}")
    print(f"urgent_flagged_any={test_scores['urgent_flagged_any']}")
    print(f"recall_any={test_scores['recall_any']}")
    print(f"false_alarm_hard_negatives={test_scores['false_alarm_hard_negatives']}")
    print(f"false_alarm_ordinary_chat={test_scores['false_alarm_ordinary_chat']}")
    print(f"flag_rate_esconv_valid={result.get('esconv_valid', {}).get('flag_rate', 'n/a')}")
    print(f"latency_ms_mean={result['latency_ms']['mean']} latency_ms_p95={result['latency_ms']['p95']}")


if __name__ == "__main__":
    main()
