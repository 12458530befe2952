"""Reference-based metrics: BLEU-1..4, ROUGE-L, Distinct-1..3, length.

BLEU: nltk `corpus_bleu` (Papineni et al.: n-gram matches and totals summed over the corpus, brevity penalty
from summed lengths), cumulative BLEU-n with uniform weights 1/n, on `text.tokenize` tokens, one reference (the
human response). Smoothing: nltk `SmoothingFunction().method1` (epsilon 0.1 added to a zero match count), which
only matters for tiny corpora. We use nltk rather than sacrebleu because nltk is already a dependency, the ESC
literature reports nltk BLEU-n, and BLEU then shares its tokenisation with Distinct. For the bootstrap, BLEU is
recomputed from per-context sufficient statistics (same formula; a test checks equality with nltk).

ROUGE-L: Google's `rouge-score` package (RougeScorer(["rougeL"], use_stemmer=False)), sentence-level F-measure
per context, averaged. Its own tokeniser lower-cases and keeps [a-z0-9] runs.

Distinct-n: corpus level, (number of distinct n-grams) / (number of n-grams) over all of a model's responses.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from scipy import sparse

from esc_evolve.evaluation.registry import MetricOutput, ModelScores, SubMetric, register_metric
from esc_evolve.evaluation.resources import EvalContext
from esc_evolve.evaluation.responses import HUMAN
from esc_evolve.text import ngrams, tokenize, words

BLEU_ORDERS = (1, 2, 3, 4)
BLEU_EPSILON = 0.1  # nltk SmoothingFunction().method1 default
DISTINCT_ORDERS = (1, 2, 3)


def corpus_bleu_nltk(hypotheses: list[str], references: list[str], max_order: int = 4) -> list[float]:
    """BLEU-1..max_order with nltk (the reference implementation of what we report)."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    weights = [tuple([1.0 / n] * n) for n in range(1, max_order + 1)]
    scores = corpus_bleu(
        [[tokenize(r)] for r in references],
        [tokenize(h) for h in hypotheses],
        weights=weights,
        smoothing_function=SmoothingFunction(epsilon=BLEU_EPSILON).method1,
    )
    return [float(s) for s in scores]


def bleu_statistics(hypothesis: str, reference: str, max_order: int = 4) -> np.ndarray:
    """[matches_1..N, totals_1..N, hyp_len, ref_len] as nltk counts them (totals are at least 1 per sentence)."""
    hyp, ref = tokenize(hypothesis), tokenize(reference)
    stats = np.zeros(2 * max_order + 2)
    for n in range(1, max_order + 1):
        hyp_counts, ref_counts = Counter(ngrams(hyp, n)), Counter(ngrams(ref, n))
        stats[n - 1] = sum(min(c, ref_counts[g]) for g, c in hyp_counts.items())
        stats[max_order + n - 1] = max(1, sum(hyp_counts.values()))
    stats[-2:] = len(hyp), len(ref)
    return stats


def bleu_from_statistics(total: np.ndarray, order: int, max_order: int = 4) -> float:
    """nltk corpus_bleu with method1 smoothing, from summed statistics."""
    matches, totals = total[:max_order], total[max_order : 2 * max_order]
    hyp_len, ref_len = total[-2], total[-1]
    if matches[0] == 0:
        return 0.0
    log_p = [math.log((m if m > 0 else BLEU_EPSILON) / t) for m, t in zip(matches[:order], totals[:order], strict=True)]
    if hyp_len > ref_len:
        bp = 1.0
    elif hyp_len == 0:
        bp = 0.0
    else:
        bp = math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(math.fsum(log_p) / order)


@register_metric("bleu")
def bleu(ctx: EvalContext) -> MetricOutput:
    subs = [
        SubMetric(f"bleu_{n}", f"corpus BLEU-{n} vs the human response (nltk, method1)", percent=True)
        for n in BLEU_ORDERS
    ]
    scores = {}
    for model in _generated(ctx):
        stats = np.stack(
            [bleu_statistics(h, r) for h, r in zip(ctx.table.responses[model], ctx.table.references, strict=True)]
        )
        scores[model] = ModelScores(corpus={f"bleu_{n}": _bleu_fn(stats, n) for n in BLEU_ORDERS})
    return MetricOutput(subs, scores, info={"implementation": "nltk.corpus_bleu, SmoothingFunction.method1(0.1)"})


def _bleu_fn(stats: np.ndarray, order: int):
    return lambda idx: bleu_from_statistics(stats[idx].sum(0), order)


@register_metric("rouge_l")
def rouge_l(ctx: EvalContext) -> MetricOutput:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = {}
    for model in _generated(ctx):
        pairs = zip(ctx.table.references, ctx.table.responses[model], strict=True)
        values = np.array([scorer.score(ref, hyp)["rougeL"].fmeasure for ref, hyp in pairs])
        scores[model] = ModelScores(per_context={"rouge_l": values})
    sub = SubMetric("rouge_l", "ROUGE-L F1 vs the human response (rouge-score, no stemming)", percent=True)
    return MetricOutput([sub], scores)


@register_metric("distinct")
def distinct(ctx: EvalContext) -> MetricOutput:
    subs = [
        SubMetric(
            f"distinct_{n}", f"distinct {n}-grams / all {n}-grams over the corpus", percent=True, bias_correct=True
        )
        for n in DISTINCT_ORDERS
    ]
    scores = {}
    for model in ctx.table.models:
        tokens = [tokenize(t) for t in ctx.table.responses[model]]
        scores[model] = ModelScores(corpus={f"distinct_{n}": _distinct_fn(tokens, n) for n in DISTINCT_ORDERS})
    return MetricOutput(subs, scores)


def distinct_n(texts: list[str], n: int) -> float:
    """Corpus Distinct-n of raw texts (helper for callers outside the registry)."""
    tokens = [tokenize(t) for t in texts]
    return _distinct_fn(tokens, n)(np.arange(len(texts)))


def _distinct_fn(tokens: list[list[str]], n: int):
    # A contexts x n-gram-types count matrix makes a resample's distinct count one sparse product.
    vocab: dict[tuple[str, ...], int] = {}
    rows, cols = [], []
    for i, toks in enumerate(tokens):
        for gram in ngrams(toks, n):
            rows.append(i)
            cols.append(vocab.setdefault(gram, len(vocab)))
    present = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(tokens), max(len(vocab), 1)))
    present.sum_duplicates()
    totals = np.asarray(present.sum(1)).ravel()
    present.data[:] = 1.0  # duplicates were summed: keep presence only

    def fn(idx: np.ndarray) -> float:
        weights = np.bincount(idx, minlength=len(tokens))
        total = float(weights @ totals)
        distinct_types = int(np.count_nonzero(present.T @ weights))
        return distinct_types / total if total else float("nan")

    return fn


@register_metric("length")
def length(ctx: EvalContext) -> MetricOutput:
    scores = {
        model: ModelScores(per_context={"length": np.array([len(words(t)) for t in ctx.table.responses[model]], float)})
        for model in ctx.table.models
    }
    sub = SubMetric("length", "mean response length in words", higher_is_better=None, digits=1)
    return MetricOutput([sub], scores)


def _generated(ctx: EvalContext) -> list[str]:
    """Reference-based metrics compare to the human response, so the human pseudo-model is skipped."""
    return [m for m in ctx.table.models if m != HUMAN]
