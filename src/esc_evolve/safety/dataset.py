"""The labelled risk messages the detector trains and is tested on (written for this project; see DATA_CARD.md).

Each line of `data/risk_messages.jsonl`: `id`, `text`, `level` (none | concern | urgent), `categories` (risk
categories for an at-risk message; the hard-negative type for a `none` one), `person`, `style`, `form` and
`split` (train | test). The test split is never used to fit or to choose thresholds.
"""

from __future__ import annotations

import json
import re
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


# ESConv seeker turns are used as extra negatives only when they are clearly not about risk: a turn with any of these
# words is left out (some ESConv seekers do speak of suicide, abuse or self-harm), and so is every turn of a
# conversation whose situation does. Broad on purpose: a left-out ordinary turn costs nothing, a risk turn labelled
# `none` would teach the classifier to miss it.
_RISK_WORDS = re.compile(
    r"suicid|kill|\bdie\b|\bdied\b|dying|\bdead\b|death|end (it|my|this|everything)|ending|my life|self.?harm"
    r"|hurt|harm|\bcut|pills?\b|tablets|overdose|\bod\b|hopeless|burden|give up|giving up|no point|pointless|worthless"
    r"|can'?t (go on|take|do this|cope)|not worth|\bguns?\b|rope|jump|bridge|abus|\bhit|beat|threat|violen|scared of"
    r"|afraid of|alive|exist|disappear|goodbye|unalive|\bkms\b|nothing left|no way out|tired of (living|life)"
    r"|want out|escape|sleep forever|(not|never|n.t) wake up|drink|drunk|alcohol|drug|weapon|knife|blade|blood"
    r"|police|safe\b|danger",
    re.IGNORECASE,
)


def esconv_negatives(path: str | Path, limit: int, seed: int = 0) -> list[RiskExample]:
    """Up to `limit` ESConv seeker turns with no risk word, in no conversation whose situation has one, as `none`
    training examples (an optional extra: ESConv is CC BY-NC, read from the user's copy, never shipped).

    ESConv seekers talk about sleep, loneliness, conflict at home, depression and "tonight" without risk: the turns
    the classifier alone flagged most in ESConv valid. Only a train split may be passed (never valid or test).
    """
    import random

    from esc_evolve.data.loaders import load_conversations

    if any(word in Path(path).name.lower() for word in ("valid", "dev", "test")):
        raise ValueError(f"{path}: only a train split may add negatives (valid and test measure the detector)")
    candidates = []
    for conv in load_conversations(path).conversations:
        if _RISK_WORDS.search(conv.profile.situation or ""):
            continue
        for index, turn in enumerate(conv.turns):
            text = turn.text.strip()
            if turn.speaker == "seeker" and len(text.split()) >= 3 and not _RISK_WORDS.search(text):
                candidates.append((f"esconv:{conv.id}:{index}", text))
    unique = list({text.lower(): (key, text) for key, text in candidates}.values())
    chosen = random.Random(seed).sample(unique, min(limit, len(unique)))
    return [
        RiskExample(id=key, text=text, level="none", categories=("esconv_turn",), split="train") for key, text in chosen
    ]
