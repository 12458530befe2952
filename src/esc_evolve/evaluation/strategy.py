"""Supporter-strategy classifier and Kang et al.'s (ACL 2024) preference-bias measure.

Classifier: sentence embedding of one supporter utterance (response only, no context) -> multinomial logistic
regression (scikit-learn, lbfgs, C=1, class_weight="balanced" so that rare strategies are not swallowed by
frequent ones; a biased classifier would inflate every model's measured preference bias). Trained once per
(training data, embedding model, hyper-parameters): the weights are cached as a plain `.npz` (no pickle) under
`<cache>/strategy_classifier/<digest>.npz`, with its held-out scores in a `.json` beside it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from esc_evolve.config import DataSettings
from esc_evolve.data import load_split
from esc_evolve.data.labels import STRATEGIES
from esc_evolve.evaluation.embedding import Embedder, texts_digest
from esc_evolve.storage import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

CLASSIFIER_PARAMS = {"C": 1.0, "class_weight": "balanced", "max_iter": 3000}
CLASSIFIER_VERSION = "logreg-v1"


@dataclass
class StrategyClassifier:
    """A linear softmax classifier over sentence embeddings; `labels[k]` is the strategy of output k."""

    labels: tuple[str, ...]
    coef: np.ndarray
    intercept: np.ndarray
    embedder_key: str
    digest: str = ""
    report: dict[str, Any] = field(default_factory=dict)

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        logits = vectors @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)

    def predict_vectors(self, vectors: np.ndarray) -> list[str]:
        if len(vectors) == 0:
            return []
        return [self.labels[k] for k in self.predict_proba(vectors).argmax(axis=1)]

    def predict(self, texts: list[str], embedder: Embedder) -> list[str]:
        return self.predict_vectors(embedder.encode(texts)) if texts else []

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            np.savez(tmp, coef=self.coef, intercept=self.intercept, labels=np.array(self.labels))
        write_json_atomic(path.with_suffix(".json"), {**self.report, "embedder": self.embedder_key})

    @classmethod
    def load(cls, path: Path, embedder_key: str) -> StrategyClassifier:
        with np.load(path, allow_pickle=False) as data:
            labels = tuple(str(x) for x in data["labels"])
            coef, intercept = data["coef"], data["intercept"]
        meta = path.with_suffix(".json")
        report = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
        return cls(labels, coef, intercept, embedder_key, path.stem, report)


def labelled_utterances(source: str, data: DataSettings | None = None) -> tuple[list[str], list[str]]:
    """Every supporter utterance with a strategy label (single utterances, not merged blocks), read with the
    run's data settings (`skip_invalid`)."""
    conversations = load_split(source, data or DataSettings()).conversations
    pairs = [(t.text, t.strategy) for c in conversations for t in c.turns if t.speaker == "supporter" and t.strategy]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def train_classifier(texts: list[str], labels: list[str], embedder: Embedder, **params: Any) -> StrategyClassifier:
    from sklearn.linear_model import LogisticRegression

    settings = {**CLASSIFIER_PARAMS, **params}
    model = LogisticRegression(**settings).fit(embedder.encode(texts), labels)
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2:  # sklearn stores one row for a binary problem; make it a 2-way softmax
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    # The embedder is in the report, as `load` reads it back: a fresh and a cached classifier report the same.
    report = {"embedder": embedder.key, "n_train": len(texts), "params": settings, "train_counts": _counts(labels)}
    return StrategyClassifier(tuple(str(c) for c in model.classes_), coef, intercept, embedder.key, report=report)


def classification_scores(gold: list[str], predicted: list[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, f1_score

    present = [s for s in STRATEGIES if s in set(gold) | set(predicted)]
    per_label = f1_score(gold, predicted, labels=present, average=None, zero_division=0)
    return {
        "n": len(gold),
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, labels=present, average="macro", zero_division=0)),
        "f1_per_label": {s: float(f) for s, f in zip(present, per_label, strict=True)},
    }


def load_or_train_classifier(
    train_path: str | None,
    embedder: Embedder,
    cache_dir: Path,
    valid_path: str | None = None,
    data: DataSettings | None = None,
) -> StrategyClassifier:
    """The cached classifier for this training data, trained (minutes on a CPU) only on the first call."""
    source = train_path or "builtin:train"
    texts, labels = labelled_utterances(source, data)
    digest = texts_digest([CLASSIFIER_VERSION, embedder.key, json.dumps(CLASSIFIER_PARAMS), *texts, *labels])
    path = Path(cache_dir) / "strategy_classifier" / f"{digest}.npz"
    changed = not path.is_file()
    if changed:
        log.info("training the strategy classifier on %d utterances of %s", len(texts), source)
        classifier = train_classifier(texts, labels, embedder)
        classifier.digest = digest
        classifier.report["train_source"] = source
    else:
        classifier = StrategyClassifier.load(path, embedder.key)
    if valid_path and classifier.report.get("valid_source") != valid_path:
        valid_texts, valid_labels = labelled_utterances(valid_path, data)
        scores = classification_scores(valid_labels, classifier.predict(valid_texts, embedder))
        classifier.report.update(valid_source=valid_path, valid=scores)
        changed = True
    if changed:
        classifier.save(path)
    return classifier


def _counts(labels: list[str]) -> dict[str, int]:
    return {s: labels.count(s) for s in STRATEGIES if s in labels}


# ---------------------------------------------------------------------------------------------------------
# Preference bias (Kang et al., ACL 2024, section 3 and their metrics.py)


def confusion_matrix(gold: list[str | None], predicted: list[str], labels: tuple[str, ...] = STRATEGIES) -> np.ndarray:
    """C[i, j] = number of turns whose gold strategy is labels[i] and whose response was classified labels[j]."""
    index = {s: k for k, s in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)))
    for g, p in zip(gold, predicted, strict=True):
        if g is not None:
            matrix[index[g], index[p]] += 1
    return matrix


def bradley_terry_mm(
    wins: np.ndarray, max_iter: int = 10_000, tol: float = 1e-9, init: np.ndarray | None = None
) -> np.ndarray:
    """Maximum-likelihood Bradley-Terry strengths by Hunter's (2004) MM algorithm.

    wins[i, j] = times i beat j (diagonal ignored). Update: p_i <- W_i / sum_{j != i} n_ij / (p_i + p_j), with
    W_i = sum_j wins[i, j] and n_ij = wins[i, j] + wins[j, i], then rescale to sum 1 (strengths are only defined
    up to scale); stop when no strength moves by more than `tol`. `init` warm-starts (the bootstrap starts from
    the full-data fit). Items with no comparison at all are returned as NaN. Written by hand: scipy and
    scikit-learn have no Bradley-Terry fit, and the algorithm is a few lines.
    """
    wins = np.array(wins, dtype=float)
    np.fill_diagonal(wins, 0.0)
    games = wins + wins.T
    active = games.sum(axis=1) > 0
    strengths = np.full(len(wins), np.nan)
    if not active.any():
        return strengths
    w, n = wins[np.ix_(active, active)].sum(axis=1), games[np.ix_(active, active)]
    p = np.full(active.sum(), 1.0 / active.sum())
    if init is not None and np.all(np.isfinite(init[active])) and init[active].sum() > 0:
        p = init[active] / init[active].sum()
    for _ in range(max_iter):
        pair_sum = p[:, None] + p[None, :]
        # n_ij > 0 implies p_i + p_j > 0 (one of the two won a game); elsewhere the term is 0 anyway
        new = w / (n / np.where(pair_sum > 0, pair_sum, 1.0)).sum(axis=1)
        new /= new.sum()
        done = np.abs(new - p).max() < tol
        p = new
        if done:
            break
    strengths[active] = p
    return strengths


@dataclass
class PreferenceBias:
    preferences: dict[str, float]  # mean 1 over the labels; 1 = neutral
    strengths: np.ndarray  # the raw fit (sum 1 over the fitted labels, NaN for labels without comparisons)
    bias: float  # population standard deviation of the preferences, in [0, sqrt(K - 1)]
    strongly_connected: bool  # False: the unsmoothed maximum-likelihood estimate would not exist


def preference_bias(
    confusion: np.ndarray,
    pseudo_count: float = 0.1,
    labels: tuple[str, ...] = STRATEGIES,
    init: np.ndarray | None = None,
    check_connectivity: bool = True,
) -> PreferenceBias:
    """Kang et al.'s preference bias B from a gold x predicted confusion matrix.

    A turn whose gold strategy i was answered with strategy j != i is a "win" of j over i (the model preferred j
    where i was right): wins = C^T off the diagonal, plus `pseudo_count` in every off-diagonal cell (keeps the
    fit finite when a strategy never loses, e.g. a model that always says "I'm sorry"). Strengths by
    `bradley_terry_mm`, rescaled to mean 1 over the K labels (Kang: sum K); labels without any comparison get 1
    (neutral). B = population standard deviation of the K preferences: 0 when no strategy is preferred, at most
    sqrt(K - 1) when one strategy takes all the preference.
    """
    k = len(labels)
    wins = np.asarray(confusion, dtype=float).T.copy()
    np.fill_diagonal(wins, 0.0)
    connected = _strongly_connected(wins) if check_connectivity else False
    wins += pseudo_count * (1.0 - np.eye(k))
    strengths = bradley_terry_mm(wins, init=init)
    active = ~np.isnan(strengths)
    prefs = np.ones(k)
    if active.any() and strengths[active].sum() > 0:
        prefs[active] = strengths[active] * active.sum() / strengths[active].sum()
    return PreferenceBias(dict(zip(labels, prefs.tolist(), strict=True)), strengths, float(np.std(prefs)), connected)


def _strongly_connected(wins: np.ndarray) -> bool:
    from scipy.sparse.csgraph import connected_components

    used = (wins + wins.T).sum(axis=1) > 0
    if used.sum() < 2:
        return False
    count, _ = connected_components(wins[np.ix_(used, used)] > 0, directed=True, connection="strong")
    return count == 1


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (base 2), in [0, 1]; scipy returns its square root (the distance)."""
    from scipy.spatial.distance import jensenshannon

    if p.sum() == 0 or q.sum() == 0:
        return math.nan
    return float(jensenshannon(p, q, base=2) ** 2)
