"""What makes `simulate` fast, and that it changes nothing it should not: the simulation's batch size and the kept
prompt state reach both engines (and one generate call per side per turn still holds), the transformers engine
gives the same replies with kept dialogues while computing only the new tokens (and a whole simulation the same
transcripts), the local simulator's own precision (`simulate.dtype`) reaches its engine and never the models
under test, and the seeker's top-p filter keeps transformers' tokens without sorting the vocabulary."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from esc_evolve.config import ExperimentConfig, GenerationSettings, ModelSettings, SimulateSettings
from esc_evolve.generation import GenerationRequest, build_generator, load_for_generation
from esc_evolve.simulation import load_role_cards
from esc_evolve.simulation.rollout import Supporter, TranscriptStore, balanced_batch
from esc_evolve.simulation.runner import TRANSCRIPTS_FILE, simulate_models
from esc_evolve.simulation.simulator import SeekerSimulator, build_simulator, simulator_dtype
from tests.generation_fixtures import computed_tokens, make_engine, tiny_model_config
from tests.test_simulation_rollout import RecordingGenerator, fake_tools, seeker_answer, supporter_answer

STORY = "My week was long: I lost my keys, missed the bus, argued with my brother and slept badly every night."


class TunedRecorder(RecordingGenerator):
    """A scripted generator that also records every `tune` call."""

    def __init__(self, answer) -> None:
        super().__init__(answer)
        self.tuned: list[dict[str, object]] = []

    def tune(self, *, batch_size: int | None = None, reuse_prompts: bool | None = None) -> None:
        self.tuned.append({"batch_size": batch_size, "reuse_prompts": reuse_prompts})


# ---------------------------------------------------------------------------------------------------------
# The simulation's settings reach the engines


@pytest.mark.parametrize(("batch_size", "reuse", "rows"), [(2, True, 2), (64, False, 3), (None, True, None)])
def test_simulation_settings_reach_both_engines_once_per_model(tmp_path, batch_size, reuse, rows):
    cards = load_role_cards()[:3]
    config = ExperimentConfig()
    config.simulate.turns = 3
    config.simulate.batch_size = batch_size
    config.simulate.reuse_prompt_cache = reuse
    config.eval.bootstrap_samples = 20
    supporters: dict[str, TunedRecorder] = {}

    def supporter(name: str) -> Supporter:
        return Supporter(name, name, lambda: supporters.setdefault(name, TunedRecorder(supporter_answer)), None)

    seeker = TunedRecorder(seeker_answer)
    sim = SeekerSimulator(seeker, "scripted seeker", SimulateSettings())
    run = [supporter("m0"), supporter("m2")]
    simulate_models(cards, run, config, tmp_path, tools=fake_tools(), simulator=sim, progress=False)

    # 3 dialogues in batches of at most 2: 2 + 1 rows, so 2 rows per batch; the store is released after each model.
    setup, release = {"batch_size": rows, "reuse_prompts": reuse}, {"batch_size": None, "reuse_prompts": False}
    for generator in supporters.values():
        assert generator.tuned == [setup, release]
        assert [len(c) for c in generator.calls] == [3, 3, 3]  # still one call per supporter turn
    assert seeker.tuned == [setup, release] * 2  # a fresh store for each model
    assert [len(c) for c in seeker.calls] == [3, 3, 3] * 2  # two seeker turns and the ratings, per model


@pytest.mark.parametrize(
    ("dialogues", "batch_size", "rows"), [(67, 64, 34), (67, 16, 14), (16, 64, 16), (64, 64, 64), (1, 8, 1)]
)
def test_batches_are_balanced(dialogues, batch_size, rows):
    assert balanced_batch(dialogues, batch_size) == rows


# ---------------------------------------------------------------------------------------------------------
# Kept prompts in the transformers engine


@pytest.fixture(scope="module")
def tiny(varied_model_dir: Path):
    return load_for_generation(tiny_model_config(varied_model_dir))


def _dialogue_turns(engine, turns: int, names: Sequence[str], counts: list[int] | None = None) -> list[list]:
    """Each row a dialogue: every turn, the engine's reply and a new user message extend the row's chat. Returns
    per turn the replies' token ids, and (with `counts`, the prefill recorder) the prompt tokens computed, prompt
    lengths and reply lengths."""
    system = "You listen. " + " ".join(f"Rule {i}: be brief and kind." for i in range(8))  # a long prompt, as a card
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": f"I am {n}. {STORY}"}] for n in names]
    history = []
    for turn in range(turns):
        requests = [
            GenerationRequest(messages=list(c), max_new_tokens=6, id=f"{i}#{turn}") for i, c in enumerate(chats)
        ]
        before = sum(counts) if counts is not None else 0
        results = engine.generate(requests, progress=False)
        computed = sum(counts) - before if counts is not None else 0
        history.append(
            (
                [r.token_ids for r in results],
                computed,
                [r.prompt_tokens for r in results],
                [r.num_tokens for r in results],
            )
        )
        for chat, result in zip(chats, results, strict=True):
            chat += [
                {"role": "assistant", "content": result.text or "..."},
                {"role": "user", "content": f"That was turn {turn}; tell me more about what happened next."},
            ]
    return history


def test_kept_prompts_give_the_same_replies_and_compute_only_the_new_tokens(tiny, monkeypatch):
    model, tokenizer = tiny
    names = ["Ada", "Bo", "Cyrus Longname"]
    counts = computed_tokens(monkeypatch)
    fresh = _dialogue_turns(make_engine(model, tokenizer, batch_size=2), 3, names, counts)
    engine = make_engine(model, tokenizer, batch_size=2)
    engine.tune(reuse_prompts=True)
    kept = _dialogue_turns(engine, 3, names, counts)
    assert [t[0] for t in kept] == [t[0] for t in fresh]  # greedy replies, token for token
    assert len({ids for t in fresh for ids in t[0]}) > 3  # replies differ: a wrong cache would show
    assert sum(t[1] for t in kept) < sum(t[1] for t in fresh) / 2
    for (_, computed, prompts, _), (_, _, earlier, replies) in zip(kept[1:], kept[:-1], strict=True):
        # Each row computes less than what its prompt grew by: the previous prompt and (most of) the reply are kept.
        growth = sum(prompts) - sum(earlier)
        assert computed < growth and computed <= growth - sum(replies) + len(names) * 6

    engine.tune(reuse_prompts=False)
    assert engine.prompt_store is None  # released
    counts.clear()
    engine.tune(reuse_prompts=True)  # a fresh store: nothing from the dialogues above is reused
    request = GenerationRequest(
        messages=[{"role": "system", "content": "You listen."}, {"role": "user", "content": "I am Ada."}]
    )
    [result] = engine.generate([request], progress=False)
    assert sum(counts) == result.prompt_tokens - 1  # the whole prompt but its last token (generate's)


def test_a_real_simulation_gives_the_same_transcripts_with_kept_prompts_and_when_rerun(tmp_path, varied_model_dir):
    """The tiny model plays both sides through the real engines (sampled seeker, greedy supporter): kept prompts
    change no transcript, and a rerun gives the same ones."""
    cards = load_role_cards()[:2]

    def run(out: Path, reuse: bool) -> list[dict]:
        config = ExperimentConfig(model=tiny_model_config(varied_model_dir))
        config.generation = GenerationSettings(max_new_tokens=8)
        config.simulate = SimulateSettings(
            turns=2, max_new_tokens=8, rating_max_new_tokens=8, dtype="float32", reuse_prompt_cache=reuse
        )
        config.eval.bootstrap_samples = 20
        build = functools.partial(build_generator, config.model, config.generation, None, seed=1)
        simulate_models(cards, [Supporter("m0", "m0", build, None)], config, out, tools=fake_tools(), progress=False)
        return [d.model_dump() for d in TranscriptStore(out / TRANSCRIPTS_FILE).read()]

    kept = run(tmp_path / "kept", True)
    assert len(kept) == 2 and all(d["finished"] for d in kept)
    assert kept == run(tmp_path / "again", True) == run(tmp_path / "fresh", False)


# ---------------------------------------------------------------------------------------------------------
# The simulator's precision


@pytest.mark.parametrize(("amx", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_auto_simulator_precision_is_bf16_only_where_the_cpu_has_amx(monkeypatch, amx, expected):
    # Not on AVX512-BF16 alone: there bf16 prefill was slower than fp32 (docs/simulation.md, "Time").
    monkeypatch.setattr("esc_evolve.simulation.simulator.cpu_has_amx", lambda: amx)
    model = ModelSettings(device="cpu", dtype="float32")
    assert simulator_dtype(SimulateSettings(), model) == expected
    assert simulator_dtype(SimulateSettings(dtype="float32"), model) == "float32"
    sim = build_simulator(SimulateSettings(), model, GenerationSettings(), seed=1)
    assert f"({'transformers'}, {expected}, no adapter)" in sim.description  # resuming tells the two apart


def test_simulator_dtype_reaches_its_engine_and_not_the_models_under_test(varied_model_dir):
    model = tiny_model_config(varied_model_dir)  # the models under test: float32
    settings = SimulateSettings(dtype="bfloat16")
    sim = build_simulator(settings, model, GenerationSettings(batch_size=4), seed=1)
    try:
        assert sim.generator.model.dtype == torch.bfloat16
        assert model.dtype == "float32"
        [text] = sim.say([[{"role": "system", "content": "Be Ada."}, {"role": "user", "content": "Hi"}]], [3])
        assert isinstance(text, str)
    finally:
        sim.close()


# ---------------------------------------------------------------------------------------------------------
# The seeker's sampling: top-p without sorting the vocabulary


def test_top_p_filter_keeps_the_warpers_tokens():
    from transformers import TopPLogitsWarper

    from esc_evolve.generation.decoding import TopPFilter

    generator = torch.Generator().manual_seed(0)
    ids = torch.zeros(8, 2, dtype=torch.long)
    for scale in (0.5, 2.0, 8.0):  # flat (the candidates hold too little: the full sort) to peaked
        scores = torch.randn(8, 4096, generator=generator) * scale
        expected = TopPLogitsWarper(0.9)(ids, scores.clone())
        got = TopPFilter(0.9, candidates=256)(ids, scores.clone())
        assert torch.equal(got == float("-inf"), expected == float("-inf"))
        assert torch.equal(got[got > float("-inf")], scores[got > float("-inf")])  # kept logits untouched
    one = torch.full((1, 4096), -5.0)
    one[0, 7] = 20.0  # one token holds the mass: it alone is kept
    assert (TopPFilter(0.9)(ids[:1], one) > float("-inf")).nonzero().tolist() == [[0, 7]]
