"""Role cards for simulated seekers: the packaged set's size and coverage, the schema's checks and messages, user
files (YAML, JSON, JSONL) and the ESC-Eval reader."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from esc_evolve.data.labels import STRATEGIES
from esc_evolve.data.vocabulary import emotions, problems
from esc_evolve.errors import DataFormatError
from esc_evolve.safety.dataset import LEVELS, RISK_CATEGORIES
from esc_evolve.safety.rules import risk_rule_categories, seeker_at_risk
from esc_evolve.simulation import RoleCard, from_esc_eval, load_role_cards, packaged_cards_path, parse_role_card
from esc_evolve.simulation.cards import card_coverage, coverage_markdown

CARDS = load_role_cards()
DATA_CARD = packaged_cards_path().with_name("ROLE_CARDS.md")


def card_record(**overrides) -> dict:
    """A valid card as a plain record (written for the tests)."""
    record = {
        "id": "test-card",
        "persona": {"life_stage": "adult, 40", "personality": "calm", "speaking_style": "plain"},
        "emotion": "sadness",
        "intensity": 3,
        "problem_type": "job crisis",
        "situation": "Robin lost a warehouse job in Hull after twelve years. The pension letter came the same week.",
        "wants": "to be heard",
        "preferred_strategies": ["Reflection of feelings"],
        "disliked_strategies": ["Providing Suggestions"],
        "strategy_notes": "listen first",
        "hidden_facts": ["The dog is called Moss.", "Robin's brother owes money."],
        "opening": "hi. rough week.",
    }
    return {**record, **overrides}


# --- the packaged set -------------------------------------------------------------------------------------------


def test_packaged_cards_load_and_number_at_least_60():
    assert len(CARDS) >= 60
    assert all(isinstance(card, RoleCard) and card.language == "en" and card.source is None for card in CARDS)


def test_ids_are_unique_slugs():
    ids = [card.id for card in CARDS]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", i) for i in ids)


def test_every_esconv_problem_type_and_beyond_is_covered():
    counts = Counter(card.problem_type for card in CARDS)
    for problem in problems():
        assert counts[problem] >= 3, problem
    others = {card.problem for card in CARDS if card.problem_type == "other"}
    assert len(others) >= 15  # caregiving, grief, chronic illness, migration, money, identity, retirement, ...
    for topic in ("caregiving", "grief", "chronic illness", "debt", "retirement", "apology", "gender", "immigration"):
        assert any(topic in problem for problem in others), topic


def test_every_emotion_and_intensity_is_used():
    assert set(emotions()) <= {card.emotion for card in CARDS}
    intensities = Counter(card.intensity for card in CARDS)
    assert all(intensities[level] >= 4 for level in range(1, 6)), intensities


def test_every_strategy_is_preferred_and_disliked_in_several_cards():
    preferred = Counter(s for card in CARDS for s in card.preferred_strategies)
    disliked = Counter(s for card in CARDS for s in card.disliked_strategies)
    for strategy in STRATEGIES:
        assert preferred[strategy] >= 5, strategy
        assert disliked[strategy] >= 5, strategy


def test_preference_profiles_are_varied_and_disjoint():
    profiles = Counter((frozenset(card.preferred_strategies), frozenset(card.disliked_strategies)) for card in CARDS)
    assert len(profiles) >= 0.8 * len(CARDS)
    preferred_sets = Counter(frozenset(card.preferred_strategies) for card in CARDS)
    assert preferred_sets.most_common(1)[0][1] <= 0.1 * len(CARDS)  # not everyone "wants to be heard"
    listeners = sum("Reflection of feelings" in card.preferred_strategies for card in CARDS)
    assert listeners < len(CARDS) / 2
    for card in CARDS:
        assert not set(card.preferred_strategies) & set(card.disliked_strategies), card.id


def test_packaged_cards_fill_every_field_the_simulator_uses():
    for card in CARDS:
        persona = card.persona
        assert persona.personality and persona.speaking_style and card.wants and card.strategy_notes, card.id
        assert 2 <= len(card.hidden_facts) <= 4, card.id
        sentences = re.split(r"(?<=[.!?])\s+", card.situation)
        assert 2 <= len(sentences) <= 4, card.id
        assert card.problem or card.problem_type != "other", card.id


def test_openings_are_the_seekers_voice_and_do_not_state_the_card():
    for card in CARDS:
        opening = card.opening.lower()
        assert card.opening and len(card.opening) < len(card.situation) / 1.5, card.id
        name = card.id.split("-")[0]  # every packaged id starts with the seeker's first name
        assert name in card.situation.lower().replace("á", "a").replace("é", "e"), card.id
        assert not re.search(rf"\b{re.escape(name)}\b", opening), card.id
        assert not any(fact.lower().rstrip(".") in opening for fact in card.hidden_facts), card.id


def test_situations_are_distinguishable_from_each_other():
    """profile_inference ranks each card's situation among the others': no two may be near-duplicates."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    situations = [card.situation for card in CARDS]
    vectors = TfidfVectorizer(stop_words="english", sublinear_tf=True).fit_transform(situations)
    similarity = (vectors @ vectors.T).toarray()
    for i in range(len(CARDS)):
        similarity[i, i] = 0.0
    worst = similarity.max()
    assert worst < 0.3, (worst, [CARDS[i].id for i in divmod(int(similarity.argmax()), len(CARDS))])


def test_risk_cards_use_the_safety_layers_labels_and_openings_describe_no_method():
    risky = [card for card in CARDS if card.at_risk]
    assert 5 <= len(risky) <= 8
    assert any(card.risk.level == "urgent" for card in risky)
    categories = {c for card in risky for c in card.risk.categories}
    assert {"suicidal_thoughts", "self_harm", "hopelessness"} <= categories
    for card in risky:
        assert card.risk.level in LEVELS and card.risk.level != "none"
        assert set(card.risk.categories) <= set(RISK_CATEGORIES)
        assert card.risk.disclosure, card.id
    for card in CARDS:
        explicit = risk_rule_categories(card.opening)
        assert not {"method_seeking", "act_in_progress", "plan_or_means"} & set(explicit), card.id
        if not card.at_risk:
            assert not seeker_at_risk(card.opening), card.id  # an ordinary card never opens like a risk card


def test_profile_is_the_gold_seeker_profile():
    card = next(c for c in CARDS if c.problem_type == "other")
    profile = card.profile()
    assert (profile.emotion_type, profile.problem_type) == (card.emotion, card.problem)
    assert profile.situation == card.situation and profile.initial_emotion_intensity == card.intensity


def test_data_card_tables_match_the_file():
    text = DATA_CARD.read_text(encoding="utf-8")
    block = text.split("<!-- coverage:start -->")[1].split("<!-- coverage:end -->")[0].strip()
    assert block == coverage_markdown(CARDS)
    tables = card_coverage(CARDS)
    assert sum(tables["problem type"].values()) == len(CARDS) == sum(tables["risk"].values())


# --- schema checks and messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "why"),
    [
        ({"preferred_strategies": ["Empathy"]}, "preferred_strategies[0]", "unknown strategy 'Empathy'"),
        ({"disliked_strategies": ["Reflection of feelings"]}, "disliked_strategies", "also in preferred_strategies"),
        ({"preferred_strategies": []}, "preferred_strategies", "at least 1"),
        ({"preferred_strategies": ["Question", "Questions"]}, "preferred_strategies", "listed more than once"),
        ({"emotion": "sad"}, "emotion", "did you mean 'sadness'"),
        ({"problem_type": "heartbreak"}, "problem_type", "unknown problem type"),
        ({"problem_type": "other"}, "problem", "required when problem_type is 'other'"),
        ({"intensity": 6}, "intensity", "less than or equal to 5"),
        ({"mood": "low"}, "mood", "unknown key"),
        ({"persona": {"life_stage": "adult", "age": 40}}, "persona.age", "unknown key"),
        ({"risk": {"level": "none", "categories": ["hopelessness"]}}, "risk.level", "unknown risk level 'none'"),
        ({"risk": {"level": "concern", "categories": ["sad"]}}, "risk.categories", "unknown risk categories"),
        ({"opening": "The dog is called Moss. Anyway."}, "opening", "gives away a hidden fact"),
        ({"language": "English"}, "language", "not a language code"),
    ],
)
def test_a_bad_card_is_rejected_naming_the_card_and_field(change, field, why):
    with pytest.raises(DataFormatError) as caught:
        parse_role_card(card_record(**change), where="cards.yaml:7")
    message = str(caught.value)
    assert message.startswith("cards.yaml:7: card 'test-card': ")
    assert f"field '{field}'" in message and why in message


def test_a_missing_field_is_named():
    record = card_record()
    del record["situation"]
    with pytest.raises(DataFormatError, match=r"card 'test-card': field 'situation': missing"):
        parse_role_card(record)


def test_spellings_are_normalised_to_the_projects_labels():
    card = parse_role_card(
        card_record(problem_type="Conflict with Parents", emotion="Sadness", preferred_strategies=["questions"])
    )
    assert (card.problem_type, card.emotion, card.preferred_strategies) == (
        "issues with parents",
        "sadness",
        ["Question"],
    )


# --- user files -------------------------------------------------------------------------------------------------


def test_user_yaml_file_loads_as_a_list_or_under_cards(tmp_path: Path):
    two = [card_record(), card_record(id="second-card", risk={"level": "urgent", "categories": ["goodbye"]})]
    listed = tmp_path / "mine.yaml"
    listed.write_text(yaml.safe_dump(two, sort_keys=False), encoding="utf-8")
    assert [c.id for c in load_role_cards(listed)] == ["test-card", "second-card"]
    wrapped = tmp_path / "mine.yml"
    wrapped.write_text(yaml.safe_dump({"cards": two}, sort_keys=False), encoding="utf-8")
    cards = load_role_cards(wrapped)
    assert cards[1].risk.level == "urgent" and cards[1].at_risk and not cards[0].at_risk


def test_user_jsonl_and_json_files_load(tmp_path: Path):
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps(card_record(id=f"card-{i}")) for i in range(3)) + "\n\n", encoding="utf-8")
    assert [c.id for c in load_role_cards(jsonl)] == ["card-0", "card-1", "card-2"]
    tabbed = tmp_path / "mine.json"  # tab indentation: not YAML, still JSON
    tabbed.write_text(json.dumps([card_record()], indent="\t"), encoding="utf-8")
    assert load_role_cards(tabbed)[0].id == "test-card"


def test_errors_in_files_name_the_line_of_the_field(tmp_path: Path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump([card_record(), card_record(id="bad", intensity=9)], sort_keys=False))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.strip() == "intensity: 9")
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))}:{line}: card 'bad': field 'intensity'"):
        load_role_cards(path)
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text(json.dumps(card_record()) + "\n" + json.dumps(card_record(id="x", emotion="meh")) + "\n")
    with pytest.raises(DataFormatError, match=r"mine.jsonl:2: card 'x': field 'emotion': unknown emotion"):
        load_role_cards(jsonl)
    jsonl.write_text(json.dumps(card_record()) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"mine.jsonl:2: malformed JSON"):
        load_role_cards(jsonl)


def test_a_duplicate_id_is_rejected_with_both_places(tmp_path: Path):
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump([card_record(), copy.deepcopy(card_record())], sort_keys=False))
    with pytest.raises(DataFormatError, match=r"dup.yaml:\d+: card 'test-card': field 'id': duplicate id \(first used"):
        load_role_cards(path)


def test_unreadable_sources_are_named(tmp_path: Path):
    with pytest.raises(DataFormatError, match="no such file"):
        load_role_cards(tmp_path / "absent.yaml")
    (tmp_path / "cards.txt").write_text("x")
    with pytest.raises(DataFormatError, match="unknown role-card file type"):
        load_role_cards(tmp_path / "cards.txt")
    (tmp_path / "empty.yaml").write_text("# nothing here\n")
    with pytest.raises(DataFormatError, match="no role cards"):
        load_role_cards(tmp_path / "empty.yaml")
    (tmp_path / "broken.yaml").write_text("- id: a\n  persona: [\n")
    with pytest.raises(DataFormatError, match=r"broken.yaml:\d+: malformed YAML"):
        load_role_cards(tmp_path / "broken.yaml")


# --- ESC-Eval ---------------------------------------------------------------------------------------------------

# A record in ESC-Eval's public role-card format (data/card_high_en.json); the text is written for this test.
ESC_EVAL_RECORD = {
    "base": "Age: young\nGender: female\nOccupation: bakery assistant\nProblem: The seeker feels lonely since her "
    "best friend moved to Perth, and weekends in the flat feel empty.",
    "res": "社会与其他",
    "source": "ExTES",
    "base_biaozhu": "年龄：年轻\n性别：女\n职业：面包店助理\n问题：……",
    "language": "english",
    "id": 90210,
}


def test_from_esc_eval_maps_what_the_format_has():
    card = from_esc_eval(ESC_EVAL_RECORD, preferred_strategies=["Self-disclosure"], disliked_strategies=["Information"])
    assert card.id == "esc-eval-90210"
    assert (card.persona.life_stage, card.persona.gender, card.persona.occupation) == (
        "young",
        "female",
        "bakery assistant",
    )
    assert card.situation.startswith("The seeker feels lonely since her best friend moved to Perth")
    assert (card.emotion, card.problem_type) == ("loneliness", "problems with friends")  # read from the text
    assert card.language == "en" and "ExTES" in card.source and "social and other" in card.source
    assert card.opening is None and card.hidden_facts == [] and card.risk is None and card.intensity == 3


def test_from_esc_eval_takes_what_the_format_lacks_from_the_caller():
    record = {
        **ESC_EVAL_RECORD,
        "base": "年龄：未提及\n性别：男\n职业：未提及\n问题：工作压力很大，经常加班。",
        "language": "chinese",
    }
    with pytest.raises(DataFormatError, match=r"card 'esc-eval-90210': field 'emotion'.*pass emotion="):
        from_esc_eval(record, preferred_strategies=["Question"], disliked_strategies=["Others"])
    card = from_esc_eval(
        record,
        preferred_strategies=["Question"],
        disliked_strategies=["Others"],
        emotion="stress",
        intensity=4,
        persona={"speaking_style": "short"},
    )
    assert (card.language, card.problem_type, card.problem) == ("zh", "other", "social and other")
    assert (card.persona.life_stage, card.persona.gender, card.persona.speaking_style) == (
        "age not stated",
        "男",
        "short",
    )
    with pytest.raises(TypeError):
        from_esc_eval(ESC_EVAL_RECORD)  # no preferences: ESC-Eval has none, and they are not invented


def test_an_esc_eval_file_given_to_the_loader_points_to_the_reader(tmp_path: Path):
    path = tmp_path / "card_high_en.json"
    path.write_text(json.dumps([ESC_EVAL_RECORD], ensure_ascii=False, indent=4), encoding="utf-8")
    with pytest.raises(DataFormatError, match="looks like an ESC-Eval role card.*from_esc_eval"):
        load_role_cards(path)
