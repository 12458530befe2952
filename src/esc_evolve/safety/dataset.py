"""The labelled risk messages the detector trains and is tested on (written for this project; see DATA_CARD.md).

Each line of `data/risk_messages.jsonl`: `id`, `text`, `level` (none | concern | urgent), `categories` (risk
categories for an at-risk message; the hard-negative type for a `none` one), `person`, `style`, `form` and
`split` (train | test). The test split is never used to fit or to choose thresholds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from esc_evolve.errors import DataFormatError

Level = Literal["none", "concern", "urgent"]
LEVELS: tuple[Level, ...] = ("none", "concern", "urgent")
RISK_CATEGORIES = (
    "suicidal_thoughts",
    "self_harm",
    "plan_or_means",
    "method_seeking",
    "act_in_progress",
    "goodbye",
    "burden",
    "hopelessness",
    "third_party_at_risk",
    "danger_from_others",
)
DATA_FILE = "risk_messages.jsonl"


@dataclass(frozen=True)
class RiskExample:
    id: str
    text: str
    level: Level
    categories: tuple[str, ...]
    split: Literal["train", "test"]
    form: str = "plain"
    person: str = "first"

    @property
    def at_risk(self) -> bool:
        return self.level != "none"


def packaged_data_path() -> Path:
    return Path(str(resources.files("esc_evolve.safety").joinpath("data", DATA_FILE)))


def load_risk_examples(path: str | Path | None = None, split: str | None = None) -> list[RiskExample]:
    """The labelled set (the packaged one by default), optionally one split only."""
    source = Path(path) if path else packaged_data_path()
    examples = []
    for line_no, line in enumerate(source.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            examples.append(_example(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataFormatError(f"{source.name}:{line_no}: {exc}") from None
    return [e for e in examples if split is None or e.split == split]


def _example(record: dict) -> RiskExample:
    level, split = record["level"], record.get("split", "train")
    if level not in LEVELS or split not in ("train", "test"):
        raise ValueError(f"level must be one of {LEVELS} and split train|test, got {level!r}, {split!r}")
    categories = tuple(record.get("categories") or ())
    unknown = [c for c in categories if c not in RISK_CATEGORIES] if level != "none" else []
    if unknown:
        raise ValueError(f"unknown risk categories {unknown} (known: {', '.join(RISK_CATEGORIES)})")
    return RiskExample(
        id=str(record["id"]),
        text=str(record["text"]),
        level=level,
        categories=categories,
        split=split,
        form=str(record.get("form", "plain")),
        person=str(record.get("person", "first")),
    )
