"""Load ESConv-family conversations from any of the files the field uses, into `Conversation`s.

Sources (`load_conversations(source)`):
- `path/to/train.jsonl`: the ESConv split format (one conversation a line; `usr`/`sys`, `text`, `strategy`),
  or MultiESC's processed files (adds per-turn `feedback`, `vad`, `cause`; `init_intensity`).
- `path/to/ESConv.json` or `FailedESConv.json`: the original raw schema, a JSON list whose turns have
  `speaker` (`seeker`/`supporter` or `speaker`/`listener`), `content` and an `annotation` dict.
- `builtin:train`, `builtin:valid`, `builtin:all`: the sample conversations packaged with esc-evolve.
- `hf:thu-coai/esconv[:split]`: the Hugging Face hub dataset (needs network; each row holds the
  conversation as a JSON string in `text`).

The formats differ in field names only, so one parser reads them all; `detect_format` names the flavour.
Bad records raise `DataFormatError` naming the file, line and field, unless `skip_invalid` is set, in which
case they are counted in `LoadResult.skipped` and logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from esc_evolve.data.labels import normalize_emotion, normalize_problem, normalize_strategy
from esc_evolve.data.schema import Conversation, SeekerProfile, Turn
from esc_evolve.errors import DataFormatError

log = logging.getLogger(__name__)

SEEKER_NAMES = frozenset({"usr", "user", "seeker", "speaker"})
SUPPORTER_NAMES = frozenset({"sys", "system", "supporter", "listener"})
BUILTIN_FILE = "sample_conversations.jsonl"
BUILTIN_VALID_EVERY = 5  # every 5th built-in conversation is held out as the built-in valid split
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark some editors write first


@dataclass
class LoadResult:
    source: str
    format: str
    conversations: list[Conversation]
    skipped: list[str] = field(default_factory=list)


class LineError(ValueError):
    """A line that is not a record at all (its bytes are not text): reported without a field."""


class RecordError(ValueError):
    """A record does not fit the schema; `field` is the dotted path of the offending field."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"field '{field_path}': {message}")


def load_conversations(source: str | Path, *, skip_invalid: bool = False, limit: int | None = None) -> LoadResult:
    """Read every conversation of `source` (see the module docstring for the accepted forms)."""
    source = str(source)
    records = _records(source)
    conversations: list[Conversation] = []
    skipped: list[str] = []
    fmt = "unknown"
    for location, payload in records:
        try:
            record = _decode(payload)
            if not isinstance(record, dict):
                raise RecordError("<record>", f"expected a JSON object, got {type(record).__name__}")
            if fmt == "unknown":
                fmt = detect_format(record)
            conversations.append(parse_record(record, conversation_id=location))
        except (RecordError, LineError) as exc:
            message = f"{location}: {exc}"
            if not skip_invalid:
                raise DataFormatError(message + "  (use --skip-invalid to skip such records)") from None
            skipped.append(message)
        if limit is not None and len(conversations) >= limit:
            break
    if skipped:
        log.warning("skipped %d invalid record(s) in %s; first: %s", len(skipped), source, skipped[0])
    if not conversations:
        raise DataFormatError(f"{source}: no valid conversations found")
    return LoadResult(source=source, format=fmt, conversations=conversations, skipped=skipped)


def _decode(payload: Any) -> Any:
    """Sources yield JSON text (a line) or already-parsed objects; decode the text here, with its location."""
    if isinstance(payload, NotUTF8):
        raise LineError(payload.message)
    if not isinstance(payload, str):
        return payload
    try:
        return json.loads(payload)
    except json.JSONDecodeError as exc:
        raise RecordError("<line>", f"malformed JSON ({exc.msg} at column {exc.colno})") from None


def detect_format(record: dict[str, Any]) -> str:
    dialog = record.get("dialog") or [{}]
    first = dialog[0] if isinstance(dialog[0], dict) else {}
    if "content" in first or "annotation" in first:
        return "esconv_raw"
    if "init_intensity" in record or "vad" in first or "all_strategy" in first or "feedback" in first:
        return "multiesc"
    return "esconv"


def parse_record(record: dict[str, Any], conversation_id: str) -> Conversation:
    dialog = record.get("dialog")
    if dialog is None:
        raise RecordError("dialog", "missing")
    if not isinstance(dialog, list) or not dialog:
        raise RecordError("dialog", "empty dialogue" if isinstance(dialog, list) else "must be a list")
    turns = tuple(_parse_turn(turn, f"dialog[{i}]") for i, turn in enumerate(dialog))
    return Conversation(id=conversation_id, profile=_parse_profile(record), turns=turns)


def _parse_turn(turn: Any, where: str) -> Turn:
    if not isinstance(turn, dict):
        raise RecordError(where, "must be an object")
    raw_speaker = turn.get("speaker")
    if raw_speaker is None:
        raise RecordError(f"{where}.speaker", "missing")
    speaker_key = str(raw_speaker).strip().lower()
    if speaker_key in SEEKER_NAMES:
        speaker = "seeker"
    elif speaker_key in SUPPORTER_NAMES:
        speaker = "supporter"
    else:
        expected = ", ".join(sorted(SEEKER_NAMES | SUPPORTER_NAMES))
        raise RecordError(f"{where}.speaker", f"unknown speaker {raw_speaker!r} (expected one of {expected})")
    text_key = "text" if "text" in turn else "content"
    text = turn.get(text_key)
    if not isinstance(text, str):
        raise RecordError(f"{where}.text", "missing" if text is None else "must be a string")
    text = " ".join(text.split())
    if not text:
        raise RecordError(f"{where}.{text_key}", "empty utterance")
    annotation = turn.get("annotation") if isinstance(turn.get("annotation"), dict) else {}
    raw_strategy = turn.get("strategy", annotation.get("strategy")) if speaker == "supporter" else None
    try:
        strategy = normalize_strategy(raw_strategy)
    except KeyError:
        raise RecordError(f"{where}.strategy", f"unknown strategy {raw_strategy!r}") from None
    feedback = _score(turn.get("feedback", annotation.get("feedback")), f"{where}.feedback")
    return Turn(speaker=speaker, text=text, strategy=strategy, raw_strategy=raw_strategy, feedback=feedback)


def _parse_profile(record: dict[str, Any]) -> SeekerProfile:
    seeker = (record.get("survey_score") or {}).get("seeker") or {}
    try:
        return SeekerProfile(
            experience_type=record.get("experience_type"),
            emotion_type=normalize_emotion(record.get("emotion_type")),
            problem_type=normalize_problem(record.get("problem_type")),
            situation=(record.get("situation") or "").strip() or None,
            initial_emotion_intensity=_score(
                seeker.get("initial_emotion_intensity", record.get("init_intensity")),
                "survey_score.seeker.initial_emotion_intensity",
            ),
            final_emotion_intensity=_score(
                seeker.get("final_emotion_intensity", record.get("final_intensity")),
                "survey_score.seeker.final_emotion_intensity",
            ),
            empathy=_score(seeker.get("empathy"), "survey_score.seeker.empathy"),
            relevance=_score(seeker.get("relevance"), "survey_score.seeker.relevance"),
        )
    except (ValidationError, AttributeError) as exc:
        raise RecordError("profile", str(exc).splitlines()[0]) from None


def _score(value: Any, where: str) -> int | None:
    """Survey and feedback scores are '1'..'5' strings in ESConv, ints in MultiESC, sometimes empty."""
    if value is None or value == "":
        return None
    try:
        score = int(float(value))
    except (TypeError, ValueError):
        raise RecordError(where, f"expected a score 1-5, got {value!r}") from None
    if not 1 <= score <= 5:
        raise RecordError(where, f"expected a score 1-5, got {value!r}")
    return score


# ---------------------------------------------------------------------------------------------------------
# Record sources: each yields (location, record) where location names file and line for error messages.


def _records(source: str) -> Iterator[tuple[str, Any]]:
    if source.startswith("builtin:"):
        return _builtin_records(source.removeprefix("builtin:"))
    if source.startswith("hf:"):
        return _hub_records(source.removeprefix("hf:"))
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataFormatError(f"{source}: no such file (expected a .jsonl/.json file, builtin:NAME or hf:REPO)")
    return _file_records(path)


def _file_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Records of a local file, read as bytes so that a byte that is not UTF-8 is reported with its line and
    column (a `.jsonl` line is then one invalid record) and a byte-order mark is accepted."""
    with path.open("rb") as handle:
        head = handle.read(4096).removeprefix(BOM).lstrip()
    if head.startswith(b"["):  # a JSON list: raw ESConv.json / FailedESConv.json
        data = path.read_bytes().removeprefix(BOM)
        try:
            records = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise DataFormatError(f"{path}:{line}: {_not_utf8(data, exc.start)}") from None
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg}") from None
        for index, record in enumerate(records):
            yield f"{path.name}:record {index}", record
        return
    yield from jsonl_lines(path)


def jsonl_lines(path: Path) -> Iterator[tuple[str, str | NotUTF8]]:
    """Non-blank lines of a JSON Lines file as `(file:line, text)`, read as bytes: a line that is not UTF-8 comes
    as `NotUTF8` naming the byte and column (the caller reports or skips it), and a byte-order mark is accepted."""
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            raw = raw.removeprefix(BOM) if line_no == 1 else raw
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield f"{path.name}:{line_no}", NotUTF8(_not_utf8(raw, exc.start))
                continue
            if line.strip():
                yield f"{path.name}:{line_no}", line


@dataclass(frozen=True)
class NotUTF8:
    """A line whose bytes are not UTF-8: an invalid record (skipped with `skip_invalid`), never a traceback."""

    message: str


def _not_utf8(data: bytes, offset: int) -> str:
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return f"not valid UTF-8 (byte 0x{data[offset]:02x} at column {column})"


def _jsonl_records(lines: Iterator[str], name: str) -> Iterator[tuple[str, Any]]:
    for line_no, line in enumerate(lines, start=1):
        if line.strip():
            yield f"{name}:{line_no}", line


def _builtin_records(split: str) -> Iterator[tuple[str, Any]]:
    if split not in {"train", "valid", "all"}:
        raise DataFormatError(
            f"builtin:{split}: unknown built-in split (use builtin:train, builtin:valid, builtin:all)"
        )
    text = resources.files("esc_evolve.data").joinpath("builtin", BUILTIN_FILE).read_text(encoding="utf-8")
    for index, (location, record) in enumerate(_jsonl_records(iter(text.splitlines()), BUILTIN_FILE)):
        held_out = index % BUILTIN_VALID_EVERY == BUILTIN_VALID_EVERY - 1
        if split == "all" or (split == "valid") == held_out:
            yield f"builtin:{location}", record


def _hub_records(spec: str) -> Iterator[tuple[str, Any]]:
    """`thu-coai/esconv:train` -> rows of the hub dataset (real network access; tested offline on a local copy)."""
    repo, _, split = spec.partition(":")
    split = split or "train"
    try:
        import datasets

        rows = datasets.load_dataset(repo, split=split)
    except Exception as exc:  # the hub raises many types: offline, missing repo, missing split
        raise DataFormatError(f"hf:{spec}: cannot load from the Hugging Face hub: {exc}") from None
    for index, row in enumerate(rows):
        text = row.get("text")
        yield f"hf:{repo}:{split}:row {index}", text if isinstance(text, str) else dict(row)
