"""Strategy classifier (tiny synthetic set), Bradley-Terry preferences and the preference-bias measure."""

from __future__ import annotations

import numpy as np
import pytest

from esc_evolve.data.labels import STRATEGIES
from esc_evolve.evaluation.evaluate import evaluate
from esc_evolve.evaluation.settings import EvaluationSettings
from esc_evolve.evaluation.strategy import (
    StrategyClassifier,
    bradley_terry_mm,
    classification_scores,
    confusion_matrix,
    js_divergence,
    load_or_train_classifier,
    preference_bias,
)
from tests.conftest import make_record, write_jsonl
from tests.eval_fixtures import SYNTHETIC_STRATEGY_DATA, HashEmbedder, make_table, tiny_classifier

K = len(STRATEGIES)


def test_diagonal_confusion_has_zero_bias():
    for pseudo in (0.0, 0.1):
        bias = preference_bias(np.diag([5.0, 3, 8, 1, 2, 4, 6, 7]), pseudo_count=pseudo)
        assert bias.bias == pytest.approx(0.0, abs=1e-9)
        assert all(v == pytest.approx(1.0) for v in bias.preferences.values())


def test_bias_toward_one_label_gives_it_the_top_preference():
    confusion = np.eye(K) * 10
    confusion[:, 5] += 6  # every gold strategy is often answered with Providing Suggestions
    bias = preference_bias(confusion)
    top = max(bias.preferences, key=bias.preferences.get)
    assert top == "Providing Suggestions"
    assert bias.bias > 0.5
    assert np.mean(list(bias.preferences.values())) == pytest.approx(1.0)


def test_always_one_label_approaches_the_maximum_bias():
    confusion = np.zeros((K, K))
    confusion[:, 4] = 25  # the "I'm so sorry" model: everything is Affirmation and Reassurance
    bias = preference_bias(confusion, pseudo_count=0.01)
    assert not bias.strongly_connected  # the unsmoothed MLE does not exist here
    assert bias.bias == pytest.approx(np.sqrt(K - 1), rel=0.05)


def test_mm_solves_the_likelihood_equations():
    rng = np.random.default_rng(0)
    wins = rng.integers(1, 20, size=(5, 5)).astype(float)
    np.fill_diagonal(wins, 0)
    p = bradley_terry_mm(wins, tol=1e-13)
    games = wins + wins.T
    expected_wins = (games * p[:, None] / (p[:, None] + p[None, :])).sum(axis=1)
    assert expected_wins == pytest.approx(wins.sum(axis=1), rel=1e-6)
    assert p.sum() == pytest.approx(1.0)


def test_mm_leaves_uncompared_items_out():
    wins = np.zeros((3, 3))
    wins[0, 1], wins[1, 0] = 3, 1
    p = bradley_terry_mm(wins)
    assert np.isnan(p[2]) and p[0] / p[1] == pytest.approx(3.0, rel=1e-6)


def test_confusion_and_jsd():
    c = confusion_matrix(["Question", "Question", None], ["Question", "Others", "Others"])
    assert c[0, 0] == 1 and c[0, 7] == 1 and c.sum() == 2
    assert js_divergence(np.array([1, 0]), np.array([1, 0])) == pytest.approx(0.0)
    assert js_divergence(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)


def test_classification_scores_hand_computed():
    scores = classification_scores(["Question", "Question", "Others"], ["Question", "Others", "Others"])
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_tiny_classifier_learns_and_round_trips(tmp_path):
    embedder = HashEmbedder()
    clf = tiny_classifier(embedder)
    texts = [t for ts in SYNTHETIC_STRATEGY_DATA.values() for t in ts]
    labels = [k for k, ts in SYNTHETIC_STRATEGY_DATA.items() for _ in ts]
    predicted = clf.predict(texts, embedder)
    assert np.mean([p == g for p, g in zip(predicted, labels, strict=True)]) > 0.9
    clf.save(tmp_path / "c.npz")
    again = StrategyClassifier.load(tmp_path / "c.npz", embedder.key)
    assert again.predict(texts, embedder) == predicted


def test_load_or_train_caches_by_data(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [make_record(), make_record(situation="Another invented story.")])
    embedder = HashEmbedder()
    first = load_or_train_classifier(str(data), embedder, tmp_path / "cache", valid_path=str(data))
    files = list((tmp_path / "cache" / "strategy_classifier").glob("*.npz"))
    assert len(files) == 1 and first.report["valid"]["n"] == 8
    second = load_or_train_classifier(str(data), embedder, tmp_path / "cache")
    assert np.allclose(second.coef, first.coef) and second.digest == first.digest
    assert second.report == first.report  # metrics.json reports the same whether trained now or read from the cache


def test_strategy_metric_on_a_table():
    table = make_table(6, 2)
    embedder = HashEmbedder()
    settings = EvaluationSettings(metrics=["strategy"], bootstrap_samples=30)
    result = evaluate(table, settings, embedder=embedder, classifier=tiny_classifier(embedder))
    info = result.info["strategy"]
    for model in table.models:
        assert sum(info["models"][model]["distribution"].values()) == len(table)
        assert 0 <= result.estimates[model]["strategy_jsd"].value <= 1
    # the base model's loop "I'm so sorry to hear that" is one strategy everywhere: the most biased
    assert result.estimates["base"]["preference_bias"].value >= result.estimates["m1"]["preference_bias"].value


@pytest.mark.slow
def test_classifier_on_esconv_valid(shared_data, tmp_path_factory):
    """Real data: train on ESConv train (cached), report accuracy and macro-F1 on valid gold utterances."""
    from esc_evolve.evaluation.embedding import default_cache_dir, load_default_embedder

    clf = load_or_train_classifier(
        str(shared_data / "esconv" / "train.jsonl"),
        load_default_embedder(default_cache_dir()),
        default_cache_dir(),
        valid_path=str(shared_data / "esconv" / "valid.jsonl"),
    )
    valid = clf.report["valid"]
    print(f"ESConv valid: accuracy {valid['accuracy']:.4f}, macro-F1 {valid['macro_f1']:.4f}, n {valid['n']}")
    assert valid["n"] > 2000
    assert valid["accuracy"] > 0.35 and valid["macro_f1"] > 0.3  # 8 classes: chance accuracy is ~0.2 (majority)
