"""The responses.jsonl contract: round trip, alignment, dropped contexts, errors."""

from __future__ import annotations

import json

import pytest

from esc_evolve.errors import DataFormatError
from esc_evolve.evaluation.responses import (
    HUMAN,
    ResponseRow,
    build_table,
    read_responses,
    samples_by_id,
    write_responses,
)
from tests.eval_fixtures import make_rows, make_samples


def test_round_trip(tmp_path):
    samples = make_samples(3, 2)
    path = tmp_path / "responses.jsonl"
    write_responses(path, make_rows(samples))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 6 * 4 and sum("sample" in line for line in lines) == 6  # each context's sample once
    table = read_responses(path)
    assert table.models == ["base", "m0", "m1", "m2", HUMAN]
    assert table.sample_ids == [s.sample_id for s in samples]
    assert table.responses[HUMAN] == [s.response for s in samples]
    assert table.reflections["m2"][0].emotion == samples[0].profile.emotion_type
    assert table.conversation_groups() == [0, 0, 1, 1, 2, 2]


def test_missing_responses_drop_the_context_for_everyone():
    samples = make_samples(2, 1)
    rows = [r for r in make_rows(samples) if not (r.model == "m1" and r.sample_id == samples[0].sample_id)]
    table = build_table(rows, samples=samples_by_id(samples))
    assert len(table) == 1 and table.dropped == {"m1": 1}


def test_errors(tmp_path):
    sample = make_samples(1, 1)[0]
    row = ResponseRow(sample_id=sample.sample_id, model="m0", response="hi")
    with pytest.raises(DataFormatError, match="no 'sample'"):
        build_table([row])
    with pytest.raises(DataFormatError, match="duplicate"):
        build_table([row, row], samples={sample.sample_id: sample})
    with pytest.raises(DataFormatError, match="m9"):
        build_table([row], samples={sample.sample_id: sample}, models=["m0", "m9"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sample_id": "x"}\n')
    with pytest.raises(DataFormatError, match="bad.jsonl:1"):
        read_responses(bad)


def test_samples_without_strategy_round_trip(tmp_path):
    sample = make_samples(1, 1)[0].model_copy(update={"strategy": None, "strategies": ()})
    path = tmp_path / "r.jsonl"
    write_responses(path, [ResponseRow(sample_id=sample.sample_id, model="m0", response="ok", sample=sample)])
    assert read_responses(path).samples == [sample]
