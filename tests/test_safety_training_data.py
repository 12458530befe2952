"""What the risk detector trains on, without training it: ESConv train seeker turns as optional extra negatives,
and when they are used. The conversations below are written for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esc_evolve.safety import detector as detector_module
from esc_evolve.safety.dataset import esconv_negatives, load_risk_examples


def _esconv_file(path: Path, conversations: list[tuple[str, list[str]]]) -> Path:
    """ESConv split format: one conversation a line, seeker (`usr`) and supporter (`sys`) turns alternating."""
    lines = []
    for situation, seeker_turns in conversations:
        dialog = []
        for text in seeker_turns:
            dialog.append({"speaker": "usr", "text": text})
            dialog.append({"speaker": "sys", "text": "I hear you.", "strategy": "Reflection of feelings"})
        record = {"emotion_type": "sadness", "problem_type": "job crisis", "situation": situation, "dialog": dialog}
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_esconv_negatives_leave_out_every_turn_that_might_be_about_risk(tmp_path: Path) -> None:
    path = _esconv_file(
        tmp_path / "train.jsonl",
        [
            (
                "I lost my job last month.",
                [
                    "I can't sleep since I lost my job, I lie awake every night.",
                    "Sometimes I think everyone would be better off if I was dead.",
                    "I feel so hopeless about it all.",
                    "My sister is coming over tonight, that helps a bit.",
                    "ok",
                ],
            ),
            ("I have thought about suicide since the breakup.", ["We were together for five years and now it's over."]),
        ],
    )
    negatives = esconv_negatives(path, limit=100)
    texts = {e.text for e in negatives}
    assert texts == {
        "I can't sleep since I lost my job, I lie awake every night.",
        "My sister is coming over tonight, that helps a bit.",
    }  # risk words, a conversation whose situation has one, and turns under 3 words are left out
    assert all(e.level == "none" and e.split == "train" and e.id.startswith("esconv:") for e in negatives)
    assert esconv_negatives(path, limit=1) == esconv_negatives(path, limit=1)  # a fixed seed: the same sample
    assert len(esconv_negatives(path, limit=1)) == 1


def test_esconv_valid_or_test_never_adds_negatives(tmp_path: Path) -> None:
    for name in ("valid.jsonl", "test.jsonl"):
        path = _esconv_file(tmp_path / name, [("work", ["My manager is unfair to me."])])
        with pytest.raises(ValueError, match="only a train split"):
            esconv_negatives(path, limit=10)


def test_esconv_negatives_are_used_only_when_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(detector_module.ESCONV_ENV, raising=False)
    assert detector_module.esconv_train_file() is None  # the default: the packaged set alone
    assert detector_module.training_examples(None) == load_risk_examples(split="train")
    monkeypatch.setenv(detector_module.ESCONV_ENV, "off")
    assert detector_module.esconv_train_file() is None
    train = _esconv_file(tmp_path / "train.jsonl", [("work", ["My manager is unfair."])])
    monkeypatch.setenv(detector_module.ESCONV_ENV, str(train))
    assert detector_module.esconv_train_file() == train
    extra = detector_module.training_examples(train)[len(load_risk_examples(split="train")) :]
    assert [e.text for e in extra] == ["My manager is unfair."]
