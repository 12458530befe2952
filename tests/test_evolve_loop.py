from pathlib import Path

import pytest

from esc_evolve.config import ExperimentConfig
from esc_evolve.data import load_train
from esc_evolve.data.prompts import encode_prompt
from esc_evolve.evolve.loop import generate_pairs as generate
from esc_evolve.evolve.loop import reflection_prompt
from esc_evolve.evolve.loop import select_contexts as select
from esc_evolve.evolve.pairs import PairStore
from esc_evolve.evolve.principles import load_principles
from esc_evolve.generation.types import GenerationRequest, GenerationResult, Generator
from tests.pipeline_fixtures import field_answer, using_the_reflection

LOOP = "I'm so sorry to hear that. " * 5
REFINED = "Waiting weeks to hear about your contract sounds exhausting. What would help most right now?"


class ScriptedGenerator(Generator):
    """Answers like a small model might: a looping draft, short reflection fields, a specific refinement."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.fail_on_call = fail_on_call
        self.draft_ids: list[str] = []

    def generate(self, requests, progress=True):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("killed")
        return [self._answer(r) for r in requests]

    def _answer(self, request: GenerationRequest) -> GenerationResult:
        if request.continuation:  # a reflection field, answered after its prefix
            assert request.messages[-1]["role"] == "user"
            return GenerationResult(field_answer(request), 5, "stop_string", request.id)
        if "What you noticed about this person" in request.messages[0]["content"]:
            assert request.temperature == 0.7 and request.seed is not None  # y' is sampled, reproducibly
            return GenerationResult(using_the_reflection(REFINED, request), 20, "stop", request.id)
        if not str(request.id).startswith("probe:"):  # the probes' drafts are M_t's too, but not of a context
            self.draft_ids.append(request.id)
        return GenerationResult(LOOP, 64, "length", request.id)


# The loop's checks on (issue 14): few-shot exemplars, grounded situations, generic probes, every pair filter.
# The defaults keep the costly ones off (docs/evolve.md, "Measured"); these tests exercise them.
CHECKS_ON = {
    "reflection_exemplars": 2,
    "situation_grounding": "lexical",
    "generic_probes": 4,
    "filters": {"role_check": "both", "drop_shortened": True, "require_reflection_use": True},
}


def _config(tmp_path: Path, contexts: int = 6) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {"run": {"output_dir": str(tmp_path)}, "evolve": {"contexts_per_iteration": contexts, **CHECKS_ON}}
    )


def select_contexts(config: ExperimentConfig, iteration: int):
    return select(load_train(config.data).samples, config.evolve, config.run.seed, iteration)


class NoRiskDetector:
    """Reads every seeker as not at risk: for tests of the pair records themselves (the packaged detector flags
    some ordinary contexts, see docs/safety.md; the safety filter has its own test with the real detector)."""

    def assess_many(self, texts, histories=None):
        from esc_evolve.safety import RiskAssessment

        return [RiskAssessment("none", 0.0, (), "test") for _ in texts]


def generate_pairs(
    config: ExperimentConfig, iteration: int, generator, tokenizer, store: PairStore, chunk_size=None, detector=None
):
    """One iteration's pairs as a notebook would make them: contexts, generator and file given, no run directory."""
    return generate(
        config.evolve,
        select_contexts(config, iteration),
        generator,
        store.path,
        iteration=iteration,
        seed=config.run.seed,
        system_prompt=config.data.system_prompt,
        tokenizer=tokenizer,
        chunk_size=chunk_size or config.generation.batch_size,
        risk_detector=detector,
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_contexts_are_fresh_each_iteration_and_seeded(tmp_path: Path) -> None:
    config = _config(tmp_path)
    first, second = select_contexts(config, 1), select_contexts(config, 2)
    assert len(first) == 6 and not {s.sample_id for s in first} & {s.sample_id for s in second}
    assert [s.sample_id for s in select_contexts(config, 1)] == [s.sample_id for s in first]
    same = _config(tmp_path).model_copy(
        update={"evolve": config.evolve.model_copy(update={"new_contexts_each_iteration": False})}
    )
    assert [s.sample_id for s in select_contexts(same, 2)] == [s.sample_id for s in first]


def test_pairs_carry_provenance_and_filters(tmp_path: Path, tokenizer) -> None:
    from esc_evolve.evolve.grounding import content_words

    store = PairStore(tmp_path / "iter1" / "pairs.jsonl")
    summary = generate_pairs(
        _config(tmp_path), 1, ScriptedGenerator(), tokenizer, store, chunk_size=4, detector=NoRiskDetector()
    )
    records = list(store.read())
    assert len(records) == 6 and summary["contexts"] == 6
    # A seeker who only said "hey" gives the situation nothing to name: generic, unparsed, dropped.
    said_something = {
        s.sample_id
        for s in select_contexts(_config(tmp_path), 1)
        if any(content_words(t.text) for t in s.context if t.speaker == "seeker")
    }
    assert 0 < len(said_something) < 6
    for record in records:
        situation = record.reflection["fields"]["situation"]
        assert record.keep == (record.sample_id in said_something), record.reasons
        assert situation["status"] == ("ok" if record.keep else "generic")
        assert record.keep or record.reasons[0] == "reflection_unparsed"
    assert summary["kept"] == len(said_something) and summary["rejected_degenerate"] == {"repetitive": 6}
    record = next(r for r in records if r.keep)
    assert record.chosen.startswith(REFINED) and record.rejected == LOOP.strip()
    assert record.reflection["fields"]["emotion"]["value"] == "anxiety"
    # the same critique for every context, probes included: generic, it carries no weight (not required, not shown)
    assert record.reflection["fields"]["critique"]["status"] == "generic" and record.reflection["parsed"]
    assert "named the contract" not in record.refine_system
    situation = record.reflection["fields"]["situation"]
    assert situation["value"] in record.refine_system and situation["evidence"]  # the seeker's words it names
    assert record.checks["reflection_use"] and set(record.checks["reflection_use"]) <= set(situation["evidence"])
    assert summary["reflection_quality"]["generic_rate"]["critique"] == 1.0
    assert summary["checks"]["reflection_use_rate"] == round(len(said_something) / 6, 4)
    # the DPO prompt is the dialogue alone: no reflection, no draft
    assert "What you noticed" not in str(record.prompt) and record.prompt[0]["role"] == "system"
    assert record.prompt[-1]["role"] == "user"
    assert record.gold["human_response"]
    assert store.export_preference(tmp_path / "iter1" / "preference.jsonl") == len(said_something)


def test_kill_mid_generation_resumes_without_loss_or_duplicates(tmp_path: Path, tokenizer) -> None:
    store = PairStore(tmp_path / "pairs.jsonl")
    # calls 1-2 answer the probes (drafts, fields), chunk 1 uses calls 3-5 (draft, reflection, refinement); die
    # inside chunk 2
    with pytest.raises(RuntimeError, match="killed"):
        generate_pairs(_config(tmp_path), 1, ScriptedGenerator(fail_on_call=7), tokenizer, store, chunk_size=2)
    assert len(store.done_ids()) == 2
    resumed = ScriptedGenerator()
    generate_pairs(_config(tmp_path), 1, resumed, tokenizer, store, chunk_size=2)
    ids = [r.sample_id for r in store.read()]
    assert len(ids) == 6 and len(set(ids)) == 6
    assert resumed.draft_ids == ids[2:]  # finished samples were not redone


def test_reflection_prompts_drop_the_oldest_turns_to_fit_the_context(tmp_path: Path, tokenizer) -> None:
    """The dialogue is quoted in one message, so the engine cannot trim it turn by turn: the loop fits it."""
    principles = load_principles(None)
    field = principles.reflection_fields[0]
    sample = max(select_contexts(_config(tmp_path, contexts=40), 1), key=lambda s: len(s.context))
    assert len(sample.context) >= 4

    def tokens(messages: list[dict[str, str]]) -> int:
        return len(encode_prompt(tokenizer, messages, continuation=field.prefix))

    full = reflection_prompt(tokenizer, field, sample.context, principles, "A draft.", None)
    budget = tokens(full) - 1
    fitted = reflection_prompt(tokenizer, field, sample.context, principles, "A draft.", budget)
    assert tokens(fitted) <= budget
    quoted = fitted[-1]["content"]
    assert sample.context[-1].text in quoted and sample.context[0].text not in quoted  # newest kept, oldest gone
    tiny = reflection_prompt(tokenizer, field, sample.context, principles, "A draft.", 10)
    assert sample.context[-1].text in tiny[-1]["content"]  # the last turn is never dropped, even when nothing fits


def test_a_refinement_that_ignores_a_seeker_at_risk_is_not_a_dpo_target(tmp_path: Path, tokenizer) -> None:
    from tests.conftest import make_record, write_jsonl

    dialog = [
        {"text": "Hi, how are you today?", "speaker": "sys", "strategy": "Question"},
        {"text": "not good. some nights I want to end my life", "speaker": "usr"},
        {"text": "I'm so glad you told me. Are you safe right now?", "speaker": "sys", "strategy": "Question"},
    ]
    data = write_jsonl(tmp_path / "crisis.jsonl", [make_record(dialog=dialog)])
    config = ExperimentConfig.model_validate(
        {
            "run": {"output_dir": str(tmp_path)},
            "data": {"train_path": str(data)},
            "evolve": {"contexts_per_iteration": 1},
        }
    )
    store = PairStore(tmp_path / "pairs.jsonl")
    generate_pairs(config, 1, ScriptedGenerator(), tokenizer, store)
    (record,) = store.read()
    assert not record.keep and "chosen_ignores_risk" in record.reasons  # REFINED gives no crisis resources


def test_the_generators_own_tokenizer_fits_the_reflection_prompts(tmp_path: Path, tokenizer) -> None:
    """Without an explicit tokenizer the generator's is used (the one it generates with). A generator with a
    context to fit and no tokenizer is an error; one without a context limit (a server) needs none."""
    from esc_evolve.errors import ConfigError

    config = _config(tmp_path, contexts=2)

    def run(generator: Generator, name: str, iteration: int) -> None:
        generate(
            config.evolve,
            select_contexts(config, iteration),
            generator,
            tmp_path / name,
            iteration=iteration,
            seed=1,
            system_prompt=None,
        )

    local = ScriptedGenerator()
    local.tokenizer, local.max_context = tokenizer, 2048
    run(local, "pairs.jsonl", 1)
    assert len(PairStore(tmp_path / "pairs.jsonl").done_ids()) == 2
    run(ScriptedGenerator(), "remote.jsonl", 2)
    assert len(PairStore(tmp_path / "remote.jsonl").done_ids()) == 2
    no_tokenizer = ScriptedGenerator()
    no_tokenizer.max_context = 2048
    with pytest.raises(ConfigError, match="tokenizer"):
        run(no_tokenizer, "other.jsonl", 3)


class SampledRefinements(ScriptedGenerator):
    """Three different y' per context, told apart by request id: the first ignores the reflection, the second
    names the reflected situation, the third loops. Records every refinement request."""

    PLAIN = "That sounds really hard. What would help most right now?"

    def __init__(self) -> None:
        super().__init__()
        self.refinement_requests: list[GenerationRequest] = []
        self.refinement_calls = 0

    def generate(self, requests, progress=True):
        refinements = [r for r in requests if "What you noticed about this person" in r.messages[0]["content"]]
        self.refinement_calls += bool(refinements)
        self.refinement_requests += refinements
        return super().generate(requests, progress)

    def _answer(self, request: GenerationRequest) -> GenerationResult:
        if request.continuation or "What you noticed about this person" not in request.messages[0]["content"]:
            return super()._answer(request)
        if str(request.id).endswith("~refine1"):
            return GenerationResult(using_the_reflection(self.PLAIN, request), 20, "stop", request.id)
        if str(request.id).endswith("~refine2"):
            return GenerationResult(LOOP, 64, "length", request.id)
        return GenerationResult(self.PLAIN, 12, "stop", request.id)


def test_several_refinements_pick_the_one_that_uses_the_reflection(tmp_path: Path, tokenizer) -> None:
    config = _config(tmp_path)
    config.evolve.refinement_samples = 3
    config.evolve.filters.require_reflection_use = False  # so the choice, not the filter, decides
    generator = SampledRefinements()
    store = PairStore(tmp_path / "pairs.jsonl")
    summary = generate_pairs(config, 1, generator, tokenizer, store, chunk_size=6, detector=NoRiskDetector())
    # one batched call for every context's three candidates, each with its own reproducible seed
    assert generator.refinement_calls == 1 and len(generator.refinement_requests) == 18
    seeds = [r.seed for r in generator.refinement_requests]
    assert None not in seeds and len(set(seeds)) == 1 + 2 * 6  # the first candidates keep y's old shared seed
    records = list(store.read())
    for record in records:
        choice = record.checks["refinement"]
        assert choice["candidates"] == 3 and choice["keepable"] <= 2  # the loop is never keepable
        if choice["using_reflection"]:  # the situation parsed: the candidate naming it wins
            assert choice["picked"] == 1 and record.chosen.startswith(SampledRefinements.PLAIN + " You mentioned")
            assert record.checks["reflection_use"]
        else:  # nothing to use: equally good, so the first
            assert choice["picked"] == 0 and record.chosen == SampledRefinements.PLAIN
    picked_other = sum(r.checks["refinement"]["picked"] != 0 for r in records)
    assert 0 < picked_other < 6
    assert summary["checks"]["refinement_picked_other_rate"] == round(picked_other / 6, 4)


def test_one_refinement_is_the_loop_as_before(tmp_path: Path, tokenizer) -> None:
    generator = SampledRefinements()
    store = PairStore(tmp_path / "pairs.jsonl")
    summary = generate_pairs(_config(tmp_path), 1, generator, tokenizer, store, detector=NoRiskDetector())
    assert [r.id for r in generator.refinement_requests] == [r.sample_id for r in store.read()]
    assert all("refinement" not in r.checks for r in store.read())
    assert "refinement_picked_other_rate" not in summary["checks"]
