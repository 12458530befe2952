"""Prefix reuse inside a batch (generation/prefill.py): prompts that quote the same long dialogue and differ only
in their end (the reflection fields of one context) compute the shared part once, with the same replies."""

from __future__ import annotations

from pathlib import Path

import pytest

from esc_evolve.generation import GenerationRequest, load_for_generation
from tests.generation_fixtures import computed_tokens, make_engine, tiny_model_config

DIALOGUE = " ".join(
    f"Seeker: this is line {i} of a long account of a hard month at work and at home." for i in range(12)
)
QUESTIONS = ["What do they feel?", "How strongly, 1 to 5?", "What happened to them?", "What do they need now?"]


def field_requests(context: str) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            messages=[{"role": "system", "content": "You reflect."}, {"role": "user", "content": f"{context}\n{q}"}],
            continuation="The answer is",
            max_new_tokens=8,
        )
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def tiny(varied_model_dir: Path):
    return load_for_generation(tiny_model_config(varied_model_dir))


def test_shared_dialogue_is_computed_once_with_the_same_replies(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny
    # Two contexts' fields in one batch, in an order that interleaves them.
    requests = [
        r for pair in zip(field_requests(DIALOGUE), field_requests(DIALOGUE + " And more."), strict=True) for r in pair
    ]
    alone = [make_engine(model, tokenizer, batch_size=1).generate([r], progress=False)[0] for r in requests]
    counts = computed_tokens(monkeypatch)
    reused = make_engine(model, tokenizer, batch_size=8).generate(requests, progress=False)
    with_reuse = sum(counts)
    counts.clear()
    without = make_engine(model, tokenizer, batch_size=8, share_prefix_min=0).generate(requests, progress=False)
    assert [r.token_ids for r in reused] == [r.token_ids for r in without] == [r.token_ids for r in alone]
    assert len({r.token_ids for r in reused}) > 1  # the replies differ: a wrong cache would show
    # Without reuse every row computes its whole prompt; with it, the dialogue is computed about once per context.
    assert with_reuse < sum(counts) / 3
