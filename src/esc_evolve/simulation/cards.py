"""Role cards: the hidden profile a simulated seeker plays (see data/ROLE_CARDS.md for the schema and the set).

A card says who the seeker is (persona), how they feel (emotion, intensity), what happened (problem type and a
specific situation), what they want from the conversation and which of ESConv's eight support strategies they
welcome or dislike, a few facts they give only when asked, their first message, and an optional risk flag. None of
it is shown to the supporter: the simulator plays the card, and the personalisation metrics score the supporter
against it (preferred/disliked strategies, whether the situation and emotion were picked out, resources for risk
cards).

`load_role_cards(None)` reads the packaged cards; `load_role_cards(path)` reads a user's YAML (`.yaml`, `.yml`,
`.json`: a list of cards, or a mapping with a `cards:` list) or JSONL file (one card a line). Errors name the file,
the line, the card id and the field. `from_esc_eval` maps one record of ESC-Eval's public role-card files.

Labels are the project's: emotions and problem types from data/vocabulary.yaml, strategies from data/labels.py
(spellings normalised as for ESConv files), risk levels and categories from the safety layer's labelled set.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from esc_evolve.config import StrictModel
from esc_evolve.data.labels import STRATEGIES, normalize_emotion, normalize_problem, normalize_strategy
from esc_evolve.data.schema import SeekerProfile
from esc_evolve.data.vocabulary import emotions, match_option, problems
from esc_evolve.errors import DataFormatError
from esc_evolve.safety.dataset import LEVELS, RISK_CATEGORIES

CARDS_FILE = "role_cards.yaml"
OTHER_PROBLEM = "other"
RISK_LEVELS: tuple[str, ...] = tuple(level for level in LEVELS if level != "none")  # a flag is never "none"
YAML_SUFFIXES = (".yaml", ".yml", ".json")
JSONL_SUFFIXES = (".jsonl",)

_ID = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


def _closest(value: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(value.lower(), [o.lower() for o in options], n=1, cutoff=0.6)
    hint = next((o for o in options if o.lower() == close[0]), None) if close else None
    return f"did you mean '{hint}'? " if hint else ""


def _strategy(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"a strategy is a string, got {type(raw).__name__}")
    try:
        label = normalize_strategy(raw)
    except KeyError:
        label = None
    if label is None:
        raise ValueError(f"unknown strategy {raw!r}: {_closest(raw, STRATEGIES)}the eight are {', '.join(STRATEGIES)}")
    return label


def _emotion(raw: Any) -> str:
    label = normalize_emotion(raw) if isinstance(raw, str) else None
    known = tuple(emotions())
    if label not in known:
        raise ValueError(f"unknown emotion {raw!r}: {_closest(str(raw), known)}known emotions are {', '.join(known)}")
    return label


def _problem_type(raw: Any) -> str:
    label = normalize_problem(raw) if isinstance(raw, str) else None
    known = (*problems(), OTHER_PROBLEM)
    if label not in known:
        raise ValueError(
            f"unknown problem type {raw!r}: {_closest(str(raw), known)}known types are {', '.join(known)} "
            f"('{OTHER_PROBLEM}' with a free-text `problem`)"
        )
    return label


def _unique(labels: list[str]) -> list[str]:
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"listed more than once: {', '.join(repeated)}")
    return labels


Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=300)]
Strategy = Annotated[str, BeforeValidator(_strategy)]
Strategies = Annotated[list[Strategy], Field(min_length=1, max_length=4), AfterValidator(_unique)]


class Persona(StrictModel):
    """Who the seeker is; the simulator speaks as this person. Only `life_stage` is required (imported cards
    often know nothing else); the packaged cards fill every field."""

    model_config = ConfigDict(frozen=True)

    life_stage: ShortText = Field(description="Age and stage of life, e.g. 'retired, 71, lives alone in Hull'.")
    gender: ShortText | None = None
    occupation: ShortText | None = None
    personality: ShortText | None = Field(None, description="Temperament: 'guarded, dry humour, hates fuss'.")
    speaking_style: ShortText | None = Field(
        None, description="How they write: 'lower-case, short bursts, no punctuation', 'formal, full sentences'."
    )


class RiskFlag(StrictModel):
    """A card whose seeker is at risk, labelled as the safety layer labels messages (safety/dataset.py)."""

    model_config = ConfigDict(frozen=True)

    level: str = Field(description=f"One of {', '.join(RISK_LEVELS)} (the safety layer's levels, less 'none').")
    categories: Annotated[list[str], Field(min_length=1), AfterValidator(_unique)] = Field(
        description="The safety layer's risk categories, main one first."
    )
    disclosure: ShortText | None = Field(
        None, description="How and when the risk shows in the conversation, for the simulator to play."
    )

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value not in RISK_LEVELS:
            raise ValueError(f"unknown risk level {value!r}: known levels are {', '.join(RISK_LEVELS)}")
        return value

    @field_validator("categories")
    @classmethod
    def _categories(cls, value: list[str]) -> list[str]:
        unknown = [c for c in value if c not in RISK_CATEGORIES]
        if unknown:
            raise ValueError(f"unknown risk categories {unknown}: known categories are {', '.join(RISK_CATEGORIES)}")
        return value


class RoleCard(StrictModel):
    """One simulated seeker. Field order matters for validation: later checks read earlier fields."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="Unique slug: lower-case letters and digits joined by '-'.")
    persona: Persona
    emotion: Annotated[str, BeforeValidator(_emotion)] = Field(
        description="The main emotion, one of the project's emotion labels (data/vocabulary.yaml)."
    )
    intensity: int = Field(ge=1, le=5, description="How strongly they feel it at the start, 1 (mild) to 5 (severe).")
    problem_type: Annotated[str, BeforeValidator(_problem_type)] = Field(
        description="An ESConv problem type as the project names it, or 'other'."
    )
    problem: ShortText | None = Field(
        None,
        validate_default=True,
        description="Free-text problem ('caregiving', 'grief'); required when problem_type is 'other'.",
    )
    situation: Annotated[str, StringConstraints(strip_whitespace=True, min_length=10, max_length=1500)] = Field(
        description="The hidden situation, specific (names, places, events): what profile inference must pick out."
    )
    wants: ShortText | None = Field(None, description="What they want from the conversation.")
    preferred_strategies: Strategies = Field(description="Strategies that land well with this seeker.")
    disliked_strategies: Strategies = Field(description="Strategies that put this seeker off; disjoint from preferred.")
    strategy_notes: ShortText | None = Field(
        None, description="Short note on timing and tone: 'wants to be heard first; suggestions early feel dismissive'."
    )
    hidden_facts: Annotated[list[Text], Field(max_length=6)] = Field(
        default_factory=list, description="Facts the seeker gives only when asked (the packaged cards have 2-4)."
    )
    opening: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=600)] | None = Field(
        None,
        description="The first seeker message, in their voice; it must not state the card. None: the simulator "
        "writes its own first message from the card (as ESC-Eval does).",
    )
    risk: RiskFlag | None = Field(None, description="Null, or the seeker's risk (checked by the safety metrics).")
    language: str = Field("en", description="Language the seeker writes in (a BCP-47 code such as 'en').")
    source: ShortText | None = Field(None, description="Where an imported card came from; null for written cards.")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError(f"id {value!r} is not a slug (lower-case letters and digits joined by '-')")
        return value

    @field_validator("problem")
    @classmethod
    def _problem(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("problem_type") == OTHER_PROBLEM:
            raise ValueError(f"required when problem_type is '{OTHER_PROBLEM}': name the problem in a few words")
        return value

    @field_validator("disliked_strategies")
    @classmethod
    def _disjoint(cls, value: list[str], info: ValidationInfo) -> list[str]:
        both = [s for s in value if s in info.data.get("preferred_strategies", ())]
        if both:
            raise ValueError(f"also in preferred_strategies: {', '.join(both)} (the two sets must not overlap)")
        return value

    @field_validator("opening")
    @classmethod
    def _opening(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            given = [f for f in info.data.get("hidden_facts", ()) if f.lower() in value.lower()]
            if given:
                raise ValueError(f"gives away a hidden fact ({given[0]!r}); hidden facts are revealed only when asked")
        return value

    @field_validator("language")
    @classmethod
    def _language(cls, value: str) -> str:
        if not _LANGUAGE.match(value):
            raise ValueError(f"language {value!r} is not a language code such as 'en' or 'pt-BR'")
        return value

    @property
    def at_risk(self) -> bool:
        return self.risk is not None

    def profile(self) -> SeekerProfile:
        """The card as the gold seeker profile that evaluation's reflection matching reads."""
        return SeekerProfile(
            emotion_type=self.emotion,
            problem_type=self.problem if self.problem_type == OTHER_PROBLEM else self.problem_type,
            situation=self.situation,
            initial_emotion_intensity=self.intensity,
        )


# --- loading ---------------------------------------------------------------------------------------------------


def packaged_cards_path() -> Path:
    """The role cards shipped with esc-evolve (written for the project; see data/ROLE_CARDS.md)."""
    return Path(str(resources.files("esc_evolve.simulation").joinpath("data", CARDS_FILE)))


def load_role_cards(path: str | Path | None = None) -> list[RoleCard]:
    """The cards of `path` (the packaged ones when None), in file order. Raises DataFormatError naming the file,
    line, card id and field for a malformed card, and for an id used twice."""
    source = Path(path) if path is not None else packaged_cards_path()
    label = CARDS_FILE if path is None else str(source)
    if not source.is_file():
        raise DataFormatError(f"{label}: no such file (role cards are a .yaml/.yml/.json or .jsonl file)")
    suffix = source.suffix.lower()
    if suffix not in YAML_SUFFIXES + JSONL_SUFFIXES:
        raise DataFormatError(f"{label}: unknown role-card file type '{suffix}' (use .yaml, .yml, .json or .jsonl)")
    try:
        text = source.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if suffix in JSONL_SUFFIXES:
        entries = _jsonl_entries(text, label)
    elif suffix == ".json":
        entries = _json_entries(text, label)
    else:
        entries = _yaml_entries(text, label)
    cards: list[RoleCard] = []
    first_at: dict[str, str] = {}
    for where, record, key_lines in entries:
        card = parse_role_card(record, where=where, key_lines=key_lines, location=label)
        if card.id in first_at:
            at = f"{label}:{key_lines['id']}" if "id" in key_lines else where
            raise DataFormatError(
                f"{at}: card '{card.id}': field 'id': duplicate id (first used at {first_at[card.id]})"
            )
        first_at[card.id] = where
        cards.append(card)
    if not cards:
        raise DataFormatError(f"{label}: no role cards found")
    return cards


def parse_role_card(
    record: Any,
    where: str = "role card",
    key_lines: Mapping[str, int] | None = None,
    location: str | None = None,
) -> RoleCard:
    """One card from a parsed record; DataFormatError `where: card 'ID': field 'F': why` when it does not fit.

    `key_lines` maps each top-level key to its line, so that the message points at the offending field's line
    (`location:line`) rather than the card's first line."""
    if not isinstance(record, Mapping):
        raise DataFormatError(f"{where}: a role card is a mapping of fields, got {type(record).__name__}")
    card_id = record.get("id")
    name = f"card '{card_id}'" if isinstance(card_id, str) and card_id else "card without an id"
    if "base" in record and "situation" not in record:
        raise DataFormatError(
            f"{where}: {name}: this looks like an ESC-Eval role card ('base' field); convert it with "
            "esc_evolve.simulation.from_esc_eval(record, preferred_strategies=..., disliked_strategies=...)"
        )
    try:
        return RoleCard.model_validate(dict(record))
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = tuple(error["loc"])
        line_where = where
        if key_lines and location and loc and loc[0] in key_lines:
            line_where = f"{location}:{key_lines[loc[0]]}"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise DataFormatError(f"{line_where}: {name}: field '{_loc(loc)}': {_message(error)}{more}") from None


def _loc(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(card)"


def _message(error: Mapping[str, Any]) -> str:
    kind, msg = error["type"], str(error["msg"])
    if kind == "extra_forbidden":
        parent = RoleCard if len(error["loc"]) == 1 else Persona if error["loc"][0] == "persona" else RiskFlag
        hint = _closest(str(error["loc"][-1]), list(parent.model_fields))
        return f"unknown key; {hint}valid keys are {', '.join(parent.model_fields)}"
    if kind == "missing":
        return "missing (a required field)"
    return msg.removeprefix("Value error, ")


# Each reader yields (where, record, key_lines): `where` names the card's position ("file:LINE"), key_lines the
# line of each top-level key where the format allows it.
Entries = Iterator[tuple[str, Any, dict[str, int]]]


def _jsonl_entries(text: str, label: str) -> Entries:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{label}:{line_no}: malformed JSON: {exc.msg}") from None
        keys = {str(k): line_no for k in record} if isinstance(record, dict) else {}
        yield f"{label}:{line_no}", record, keys


def _json_entries(text: str, label: str) -> Entries:
    """A JSON file is read as YAML (a superset of JSON) for line numbers; JSON that YAML rejects (tab
    indentation) is read as plain JSON, with card numbers instead of lines."""
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{label}:{exc.lineno}: malformed JSON: {exc.msg}") from None
    try:
        yield from list(_yaml_entries(text, label))
    except DataFormatError as exc:
        if "malformed YAML" not in str(exc):
            raise
        data = json.loads(text)
        records = data.get("cards") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise DataFormatError(f"{label}: expected a list of role cards or 'cards:'") from None
        for number, record in enumerate(records, start=1):
            yield f"{label}: card #{number}", record, {}


def _yaml_entries(text: str, label: str) -> Entries:
    """Each card of a YAML (or JSON) document with its line and the line of each of its top-level keys."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return
        if isinstance(root, yaml.MappingNode):
            found = [value for key, value in root.value if getattr(key, "value", None) == "cards"]
            if not found:
                raise DataFormatError(f"{label}:{root.start_mark.line + 1}: expected a list of cards or 'cards:'")
            root = found[0]
        if not isinstance(root, yaml.SequenceNode):
            raise DataFormatError(f"{label}:{root.start_mark.line + 1}: expected a list of role cards")
        for item in root.value:
            record = loader.construct_object(item, deep=True)
            keys = (
                {str(k.value): k.start_mark.line + 1 for k, _ in item.value}
                if isinstance(item, yaml.MappingNode)
                else {}
            )
            yield f"{label}:{item.start_mark.line + 1}", record, keys
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark is not None else label
        raise DataFormatError(f"{where}: malformed YAML: {getattr(exc, 'problem', None) or exc}") from None
    finally:
        loader.dispose()


# --- coverage ----------------------------------------------------------------------------------------------------


def card_coverage(cards: Sequence[RoleCard]) -> dict[str, dict[str, int]]:
    """Counts of cards per problem type, emotion, intensity, preferred and disliked strategy, and risk level, with
    every known label present (0 when unused); ROLE_CARDS.md's tables are this for the packaged cards."""
    tables: dict[str, dict[str, int]] = {
        "problem type": dict.fromkeys((*problems(), OTHER_PROBLEM), 0),
        "emotion": dict.fromkeys(emotions(), 0),
        "intensity": dict.fromkeys(("1", "2", "3", "4", "5"), 0),
        "preferred strategy": dict.fromkeys(STRATEGIES, 0),
        "disliked strategy": dict.fromkeys(STRATEGIES, 0),
        "risk": dict.fromkeys(("none", *RISK_LEVELS), 0),
    }
    for card in cards:
        tables["problem type"][card.problem_type] += 1
        tables["emotion"][card.emotion] += 1
        tables["intensity"][str(card.intensity)] += 1
        for strategy in card.preferred_strategies:
            tables["preferred strategy"][strategy] += 1
        for strategy in card.disliked_strategies:
            tables["disliked strategy"][strategy] += 1
        tables["risk"][card.risk.level if card.risk else "none"] += 1
    return tables


def coverage_markdown(cards: Sequence[RoleCard]) -> str:
    """`card_coverage` as Markdown tables (strategies in one table: preferred and disliked side by side)."""
    tables = card_coverage(cards)
    lines = [f"{len(cards)} cards.", ""]
    for name in ("problem type", "emotion", "intensity", "risk"):
        lines += [f"| {name} | cards |", "| --- | ---: |"]
        lines += [f"| {label} | {count} |" for label, count in tables[name].items()]
        lines.append("")
    lines += ["| strategy | preferred in | disliked in |", "| --- | ---: | ---: |"]
    lines += [f"| {s} | {tables['preferred strategy'][s]} | {tables['disliked strategy'][s]} |" for s in STRATEGIES]
    return "\n".join(lines)


# --- ESC-Eval ----------------------------------------------------------------------------------------------------

# ESC-Eval (Zhao et al., 2024; github.com/haidequanbu/ESC-Eval, data/card_high_en.json) ships role cards as a JSON
# list of {"base": "Age: ...\nGender: ...\nOccupation: ...\nProblem: ...", "res": topic (Chinese), "source":
# the dataset the card was drawn from (ESconv, ExTES, MHP, ...), "base_biaozhu": the Chinese translation,
# "language": "english" | "chinese", "id": int}. Its simulator receives only `base`.
ESC_EVAL_TOPICS = {"家庭生活": "family life", "工作学习": "work and study", "社会与其他": "social and other"}
_ESC_EVAL_FIELDS = {
    "age": "age",
    "年龄": "age",
    "gender": "gender",
    "性别": "gender",
    "occupation": "occupation",
    "职业": "occupation",
    "problem": "problem",
    "问题": "problem",
}
_NOT_MENTIONED = {"not mentioned", "未提及", "unknown", "none", ""}
_ESC_EVAL_LANGUAGES = {"english": "en", "chinese": "zh", "en": "en", "zh": "zh"}


def from_esc_eval(
    record: Mapping[str, Any],
    *,
    preferred_strategies: Sequence[str],
    disliked_strategies: Sequence[str],
    **fields: Any,
) -> RoleCard:
    """A RoleCard from one ESC-Eval role card.

    Mapped: `id` -> `esc-eval-<id>`; Age/Gender/Occupation -> persona (life_stage 'age not stated' when absent);
    Problem -> situation; `language`; `source` and `res` -> `source` (with the topic in English). Inferred from
    the Problem text with the project's cue vocabularies (English only): `emotion` and `problem_type` ('other'
    with the ESC-Eval topic as `problem` when no ESConv type is named). Not in ESC-Eval, so the caller supplies
    them: the strategy preferences (required; ESC-Eval seekers have none, and inventing them would make
    preference alignment meaningless). Not in ESC-Eval and left empty: personality, speaking style, wants,
    strategy notes, hidden facts, opening (the simulator writes one), risk; `intensity` defaults to 3. Any of
    these, and any inferred field, can be given as keyword `fields` (e.g. `emotion="sadness"`, `intensity=4`).
    """
    record_id = record.get("id")
    card_id = f"esc-eval-{record_id}".lower().replace("_", "-")
    where = f"ESC-Eval card {record_id!r}"
    base = record.get("base")
    if not isinstance(base, str) or not base.strip():
        raise DataFormatError(f"{where}: card '{card_id}': field 'base': missing (the ESC-Eval card text)")
    parsed = _esc_eval_base(base)
    situation = parsed.get("problem")
    if not situation:
        raise DataFormatError(f"{where}: card '{card_id}': field 'base': no 'Problem:' line")
    topic = ESC_EVAL_TOPICS.get(str(record.get("res", "")), str(record.get("res") or "") or None)
    card: dict[str, Any] = {
        "id": card_id,
        "persona": {
            "life_stage": parsed.get("age") or "age not stated",
            "gender": parsed.get("gender"),
            "occupation": parsed.get("occupation"),
        },
        "intensity": 3,
        "situation": situation,
        "preferred_strategies": list(preferred_strategies),
        "disliked_strategies": list(disliked_strategies),
        "language": _ESC_EVAL_LANGUAGES.get(str(record.get("language", "english")).lower(), "en"),
        "source": f"ESC-Eval card {record_id} ({record.get('source', 'unknown source')}; topic: {topic})",
    }
    if "emotion" not in fields:
        emotion = match_option(situation, emotions())
        if emotion is None:
            raise DataFormatError(
                f"{where}: card '{card_id}': field 'emotion': ESC-Eval cards name no emotion and none could be read "
                "from the problem text; pass emotion=..."
            )
        card["emotion"] = emotion
    if "problem_type" not in fields:
        card["problem_type"] = match_option(situation, problems()) or OTHER_PROBLEM
        if card["problem_type"] == OTHER_PROBLEM:
            card["problem"] = topic or "not stated"
    persona = {**card["persona"], **fields.pop("persona", {})}
    card.update(fields)
    card["persona"] = persona
    return parse_role_card(card, where=where)


def _esc_eval_base(base: str) -> dict[str, str]:
    """'Age: young\\nGender: female\\n...' -> {'age': 'young', 'gender': 'female', ...}; 'not mentioned' dropped."""
    parsed: dict[str, str] = {}
    field = None
    for line in base.splitlines():
        key, sep, value = line.replace("：", ":").partition(":")
        named = _ESC_EVAL_FIELDS.get(key.strip().lower()) if sep else None
        if named:
            field = named
            if value.strip().lower() not in _NOT_MENTIONED:
                parsed[field] = value.strip()
        elif field == "problem" and line.strip():  # a Problem text that runs over several lines
            parsed["problem"] = f"{parsed.get('problem', '')} {line.strip()}".strip()
    return parsed
