"""The risk detector: its labelled set, its quality on the held-out test split, and the `safety check` command.

The detector is the packaged one (MiniLM fine-tuned on the train split), trained once per machine and cached; the
first test that needs it pays for the training (a few minutes on 2 CPU cores). The messages below are written for
the tests and are not in the labelled set.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esc_evolve.cli.app import app
from esc_evolve.safety import default_detector
from esc_evolve.safety.dataset import RISK_CATEGORIES, load_risk_examples
from esc_evolve.safety.detector import message_parts

runner = CliRunner()


@pytest.fixture(scope="module")
def detector():
    return default_detector()


def test_the_labelled_set_covers_every_category_in_both_splits() -> None:
    examples = load_risk_examples()
    at_risk = [e for e in examples if e.at_risk]
    negatives = [e for e in examples if not e.at_risk]
    assert len(examples) >= 600 and len(at_risk) >= 300 and len(negatives) >= len(at_risk)
    assert len({e.text.strip().lower() for e in examples}) == len(examples)
    for split in ("train", "test"):
        main = Counter(e.categories[0] for e in at_risk if e.split == split)
        assert set(main) == set(RISK_CATEGORIES), split
    forms = Counter(e.form for e in at_risk)
    assert all(forms[f] >= 20 for f in ("short", "long", "lowercase", "typo", "embedded"))
    assert Counter(e.person for e in at_risk)["third"] >= 20


def test_long_messages_are_also_read_in_windows() -> None:
    long = "Work has been chaotic all month and my manager keeps moving deadlines. " * 2 + (
        "Honestly I have the pills saved up. Anyway, the team dinner is on Friday."
    )
    parts = message_parts(long)
    assert parts[0] == long and any(p.startswith("Honestly I have the pills") for p in parts[1:])
    assert message_parts("short one") == ["short one"]


def test_a_short_reply_after_a_message_at_risk_stays_at_risk(detector) -> None:
    history = ["I don't want to be alive anymore"]
    carried = detector.assess("yes, tonight", history)
    assert carried.at_risk and "right after a message at risk" in carried.reason
    assert not detector.assess("yes, tonight", ["my exam is on monday"]).at_risk
    long_reply = "I went to the shop, bought some bread and then watched a film with my flatmate"
    assert not detector.assess(long_reply, history).at_risk  # a longer message is read on its own


def test_recall_and_false_alarms_on_the_held_out_test_split(detector) -> None:
    test = load_risk_examples(split="test")
    assessed = detector.assess_many([e.text for e in test])
    flagged = [a.at_risk for a in assessed]
    recall = sum(f for f, e in zip(flagged, test, strict=True) if e.at_risk) / sum(e.at_risk for e in test)
    false_alarms = sum(f for f, e in zip(flagged, test, strict=True) if not e.at_risk) / sum(
        not e.at_risk for e in test
    )
    # Floors well under the measured figures (benchmarks/README.md): a broken training or threshold fails here.
    assert recall >= 0.8 and false_alarms <= 0.3, (recall, false_alarms)


def test_messages_the_old_phrase_list_missed(detector) -> None:
    at_risk = [
        "the rope is already in the garage, I checked twice",
        "i gave my cat to my neighbour today, she'll take better care of her than i could",
        "how many of my nan's heart tablets would be enough, asking for real",
        "my husband said if I call anyone tonight he will finish me",
        "my little brother texted me goodbye and isn't picking up",
        "they would all breathe easier if I just stopped being around",
    ]
    assessed = detector.assess_many(at_risk)
    assert sum(a.at_risk for a in assessed) >= 5, [a.to_dict() for a in assessed]
    assert all(a.categories and a.reason for a in assessed if a.at_risk)


def test_ordinary_hard_messages_are_mostly_not_flagged(detector) -> None:
    negatives = [
        "this project deadline is honestly killing me lol",
        "my mum passed last spring and some days I still cry in the car",
        "we watched a documentary about suicide prevention in class today",
        "I got dumped and I'm eating ice cream in bed, send memes",
        "what's the max paracetamol for an adult with a fever",
        "I'm not going to do anything silly, I just need to rant about my boss",
    ]
    assert sum(a.at_risk for a in detector.assess_many(negatives)) <= 1


def test_check_one_message(detector) -> None:
    result = runner.invoke(app, ["safety", "check", "I already swallowed the whole bottle of pills"])
    assert result.exit_code == 0, result.output
    assert "urgent" in result.output and "1 message(s): 1 urgent" in result.output


def test_check_a_file_as_json_in_input_order(tmp_path: Path, detector) -> None:
    path = tmp_path / "m.jsonl"
    lines = [
        {"text": "my exam went badly but I'll retake it"},
        {"text": "I have the pills in my hand right now"},
        {"text": "same as before", "history": ["I don't want to be alive anymore"]},
    ]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(x) for x in lines).encode() + b"\n")  # a BOM is fine
    result = runner.invoke(app, ["safety", "check", "--file", str(path), "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["line"] for r in rows] == ["m.jsonl:1", "m.jsonl:2", "m.jsonl:3"]
    assert all({"level", "score", "categories", "reason"} <= set(r) for r in rows)
    assert rows[0]["level"] == "none" and rows[1]["level"] == "urgent" and rows[2]["level"] != "none"


def test_a_line_that_is_not_utf8_is_named_or_skipped(tmp_path: Path, detector) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xff"}\n')
    result = runner.invoke(app, ["safety", "check", "--file", str(path)])
    assert result.exit_code == 2
    assert "bad.jsonl:2: not valid UTF-8 (byte 0xff at column 14)" in result.output
    skipped = runner.invoke(app, ["safety", "check", "--file", str(path), "--json", "--skip-invalid"])
    assert skipped.exit_code == 0, skipped.output
    assert [json.loads(line)["line"] for line in skipped.stdout.splitlines()] == ["bad.jsonl:1"]


def test_text_and_file_together_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["safety", "check", "hello", "--file", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2 and "either a TEXT argument or --file" in result.output
