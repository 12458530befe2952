import json
from collections import Counter
from pathlib import Path

import pytest

from esc_evolve.data import load_conversations
from esc_evolve.data.labels import STRATEGIES, normalize_problem, normalize_strategy
from esc_evolve.data.stats import corpus_stats
from esc_evolve.errors import DataFormatError
from tests.conftest import make_record, write_jsonl


def test_esconv_jsonl_record_is_parsed_and_normalised(tmp_path: Path) -> None:
    loaded = load_conversations(write_jsonl(tmp_path / "d.jsonl", [make_record()]))
    assert loaded.format == "esconv"
    (conv,) = loaded.conversations
    assert conv.id == "d.jsonl:1"
    assert conv.profile.emotion_type == "anxiety"
    assert conv.profile.problem_type == "job crisis"
    assert conv.profile.initial_emotion_intensity == 4 and conv.profile.final_emotion_intensity == 2
    assert [t.speaker for t in conv.turns][:3] == ["supporter", "seeker", "seeker"]
    assert conv.turns[4].strategy == "Question" and conv.turns[4].raw_strategy == "Questions"
    assert conv.turns[1].strategy is None


def test_raw_schema_with_speaker_listener_and_annotation(tmp_path: Path) -> None:
    raw = [
        {
            "experience_type": "Previous Experience",
            "emotion_type": "sadness",
            "problem_type": "conflict with parents",
            "situation": "We argue every weekend.",
            "survey_score": {"seeker": {"initial_emotion_intensity": "5"}},
            "dialog": [
                {"speaker": "speaker", "annotation": {}, "content": "hello\n"},
                {"speaker": "listener", "annotation": {"strategy": "Other"}, "content": "hi, how are you?"},
                {"speaker": "speaker", "annotation": {"feedback": "4"}, "content": "not great"},
                {
                    "speaker": "listener",
                    "annotation": {"strategy": "Approval and Reassurance"},
                    "content": "I hear you.",
                },
            ],
        }
    ]
    path = tmp_path / "Raw.json"
    path.write_text(json.dumps(raw))
    loaded = load_conversations(path)
    assert loaded.format == "esconv_raw"
    conv = loaded.conversations[0]
    assert conv.id == "Raw.json:record 0"
    assert conv.profile.problem_type == "issues with parents"
    assert conv.turns[0].text == "hello"  # trailing newline normalised
    assert conv.turns[1].strategy == "Others"
    assert conv.turns[2].feedback == 4
    assert conv.turns[3].strategy == "Affirmation and Reassurance"


def test_multiesc_record(tmp_path: Path) -> None:
    record = {
        "emotion_type": "fear",
        "problem_type": "Sleep Problems",
        "situation": "I wake at 3am.",
        "init_intensity": 4,
        "final_intensity": 2,
        "dialog": [
            {"text": "Hi , how can I help ?", "speaker": "sys", "strategy": "Greeting", "all_strategy": ["Greeting"]},
            {"text": "I can not sleep .", "speaker": "usr", "vad": [0.1, 0.2, 0.3], "cause": "sleep", "feedback": "3"},
            {
                "text": "Try a fixed bedtime .",
                "speaker": "sys",
                "strategy": "Providing Suggestions or Information",
                "all_strategy": ["Providing Suggestions"],
            },
            {"text": "ok", "speaker": "usr", "vad": [0.1, 0.2, 0.3], "cause": None, "feedback": None},
        ],
    }
    loaded = load_conversations(write_jsonl(tmp_path / "m.jsonl", [record]))
    assert loaded.format == "multiesc"
    conv = loaded.conversations[0]
    assert conv.profile.initial_emotion_intensity == 4 and conv.profile.problem_type == "sleep problems"
    assert conv.turns[0].strategy == "Others" and conv.turns[0].raw_strategy == "Greeting"
    assert conv.turns[1].feedback == 3
    assert conv.turns[2].strategy == "Providing Suggestions"


def test_hub_loader_reads_a_local_dataset_folder(tmp_path: Path) -> None:
    """hf:REPO goes through datasets.load_dataset; offline we point it at a local folder of the hub layout."""
    folder = tmp_path / "esconv"
    folder.mkdir()
    write_jsonl(folder / "train.json", [{"text": json.dumps(make_record())}, {"text": json.dumps(make_record())}])
    loaded = load_conversations(f"hf:{folder}:train")
    assert len(loaded.conversations) == 2
    assert loaded.conversations[1].id == f"hf:{folder}:train:row 1"


def test_hub_loader_failure_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="cannot load from the Hugging Face hub"):
        load_conversations(f"hf:{tmp_path / 'missing'}:train")


def test_builtin_splits_are_disjoint_and_cover_all() -> None:
    train = load_conversations("builtin:train").conversations
    valid = load_conversations("builtin:valid").conversations
    everything = load_conversations("builtin:all").conversations
    assert len(train) + len(valid) == len(everything) >= 30
    assert not {c.id for c in train} & {c.id for c in valid}
    stats = corpus_stats(everything)
    assert set(stats.strategies) == set(STRATEGIES)
    assert len(stats.emotions) >= 5 and len(stats.problems) >= 8


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.pop("dialog"), "field 'dialog': missing"),
        (lambda r: r.update(dialog=[]), "empty dialogue"),
        (lambda r: r["dialog"][2].update(speaker="bot"), "field 'dialog[2].speaker': unknown speaker 'bot'"),
        (lambda r: r["dialog"][1].pop("text"), "field 'dialog[1].text': missing"),
        (lambda r: r["dialog"][1].update(text="   "), "field 'dialog[1].text': empty utterance"),
        (lambda r: r["dialog"][3].update(strategy="Hugging"), "field 'dialog[3].strategy': unknown strategy"),
        (lambda r: r["survey_score"]["seeker"].update(empathy="9"), "survey_score.seeker.empathy"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path: Path, mutate, field: str) -> None:
    good, bad = make_record(), make_record()
    mutate(bad)
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(DataFormatError) as err:
        load_conversations(path)
    assert "bad.jsonl:2" in str(err.value)
    assert field in str(err.value)


def test_malformed_line_and_skip_invalid(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(make_record()) + "\n{not json\n\n" + json.dumps(make_record()) + "\n")
    with pytest.raises(DataFormatError, match=r"mixed.jsonl:2: field '<line>': malformed JSON"):
        load_conversations(path)
    loaded = load_conversations(path, skip_invalid=True)
    assert len(loaded.conversations) == 2
    assert len(loaded.skipped) == 1 and "mixed.jsonl:2" in loaded.skipped[0]


def test_missing_file_and_all_invalid(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no such file"):
        load_conversations(tmp_path / "nope.jsonl")
    path = tmp_path / "junk.jsonl"
    path.write_text("[1, 2]\n")  # a JSON list of non-objects
    with pytest.raises(DataFormatError, match="expected a JSON object"):
        load_conversations(path)
    with pytest.raises(DataFormatError, match="no valid conversations"):
        load_conversations(path, skip_invalid=True)


def test_limit_stops_early(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [make_record()] * 5)
    assert len(load_conversations(path, limit=3).conversations) == 3


def test_label_normalisation() -> None:
    assert normalize_strategy("[Questions]") == "Question"
    assert normalize_strategy("other") == "Others"
    assert normalize_strategy("") is None
    with pytest.raises(KeyError):
        normalize_strategy("nonsense")
    assert normalize_problem("Issues with Parents") == normalize_problem("conflict with parents")


# -- the real corpus in ../shared/data ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "conversations", "fmt"),
    [
        ("esconv/train.jsonl", 910, "esconv"),
        ("esconv/valid.jsonl", 195, "esconv"),
        ("multiesc/valid.jsonl", 195, "multiesc"),
        ("esconv_failed/FailedESConv.json", 196, "esconv_raw"),
    ],
)
def test_real_files_load_completely(shared_data: Path, relative: str, conversations: int, fmt: str) -> None:
    loaded = load_conversations(shared_data / relative)
    assert loaded.format == fmt
    assert len(loaded.conversations) == conversations
    assert not loaded.skipped
    stats = corpus_stats(loaded.conversations)
    # every supporter utterance carries one of the 8 canonical labels
    assert sum(stats.strategies.values()) == stats.supporter_utterances
    assert set(stats.strategies) <= set(STRATEGIES)
    raw = (
        [json.loads(line) for line in (shared_data / relative).open()]
        if relative.endswith(".jsonl")
        else json.loads((shared_data / relative).read_text())
    )
    assert stats.utterances == sum(len(r["dialog"]) for r in raw)


def test_real_label_variants_are_unified(shared_data: Path) -> None:
    train = corpus_stats(load_conversations(shared_data / "esconv/train.jsonl").conversations)
    failed = corpus_stats(load_conversations(shared_data / "esconv_failed/FailedESConv.json").conversations)
    assert "issues with parents" in train.problems and "conflict with parents" not in train.problems
    assert "Questions" not in failed.strategies and "Other" not in failed.strategies
    raw = json.loads((shared_data / "esconv_failed/FailedESConv.json").read_text())
    raw_counts = Counter(
        t["annotation"].get("strategy") for r in raw for t in r["dialog"] if t["speaker"] == "listener"
    )
    assert failed.strategies["Question"] == raw_counts["Questions"] + raw_counts["Question"]


def test_a_line_that_is_not_utf8_names_file_line_byte_and_column(tmp_path: Path) -> None:
    good = json.dumps(make_record()).encode()
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + b'{"dialog": "caf\xe9"}\n' + good + b"\n")
    with pytest.raises(DataFormatError, match=r"latin1\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        load_conversations(path)
    loaded = load_conversations(path, skip_invalid=True)
    assert len(loaded.conversations) == 2 and "latin1.jsonl:2: not valid UTF-8" in loaded.skipped[0]


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(bom + json.dumps(make_record()).encode() + b"\n")
    assert len(load_conversations(lines).conversations) == 1
    listed = tmp_path / "bom.json"
    listed.write_bytes(bom + json.dumps([make_record()]).encode())
    assert len(load_conversations(listed).conversations) == 1


def test_a_json_list_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "ESConv.json"
    path.write_bytes(b'[\n  {"dialog": []},\n  {"situation": "na\xefve"}\n]')
    with pytest.raises(DataFormatError, match=r"ESConv\.json:3: not valid UTF-8 \(byte 0xef at column 20\)"):
        load_conversations(path)
