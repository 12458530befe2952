"""Judge-free proxy of an unhelpful response. A response is flagged when any rule fires:

- empty: no word at all;
- generic: fewer than 3 words are left once stock phrases (STOCK_PHRASES, matched on the lower-cased text) are
  removed, e.g. "I'm so sorry to hear that. I understand.";
- repetitive: the share of repeated word 3-grams exceeds `repetition_threshold` (default 0.5), or one sentence
  occurs 3 or more times (the "I'm so sorry to hear that." loop to the token limit); both checks, and the empty
  one, are defined in `esc_evolve.text`;
- off_topic: cosine(response, the last CONTEXT_TURNS turns of the context joined) < `offtopic_threshold`
  (default 0.1 for all-MiniLM-L6-v2: on 400 ESConv valid contexts it flags 4.8% of the human responses and 44% of
  human responses moved to another conversation's context).
`context_similarity` (the cosine itself) is reported too. The LLM judge's unhelpful rate is in metrics/judge.py.
"""

from __future__ import annotations

import re

import numpy as np

from esc_evolve.evaluation.registry import MetricOutput, ModelScores, SubMetric, register_metric
from esc_evolve.evaluation.resources import EvalContext
from esc_evolve.text import is_empty, normalize_text, repeated_ngram_share, sentence_repeats, words

MIN_CONTENT_WORDS = 3
CONTEXT_TURNS = 3
MAX_SENTENCE_REPEATS = 3
_SORRY = r"(?:i'?m|i am) (?:so |very |really |truly )?sorry(?: to hear (?:that|this|about that)| about (?:that|this))?"
STOCK_PHRASES: tuple[str, ...] = (
    _SORRY,
    r"that(?:'s| is) (?:so |really |very )?(?:sad|terrible|awful|tough|hard|rough|understandable)",
    r"(?:that|it) (?:must be|sounds|seems) (?:so |really |very )?(?:hard|tough|difficult|rough|awful|terrible|"
    r"frustrating|stressful|upsetting|painful)(?: for you)?",
    r"i (?:can )?(?:understand|see|hear you|get it)(?: how you (?:feel|are feeling))?",
    r"i know how you feel",
    r"i'?m here (?:for you|to (?:help|listen))",
    r"thank(?:s| you) for sharing(?: that| this)?(?: with me)?",
    r"you(?:'re| are) not alone",
    r"(?:it'?s|that'?s) (?:ok|okay|alright|all right)",
    r"how (?:are|do) you (?:feel|feeling|doing)(?: about (?:that|it|this)| now| today)?",
    r"(?:oh|ah|hmm|hi|hello|hey|well|yes|yeah|okay|ok|wow)",
)
_STOCK = re.compile(r"\b(?:" + "|".join(STOCK_PHRASES) + r")\b")

SUBMETRICS = [
    SubMetric("unhelpful_proxy", "flagged by any judge-free rule (empty, generic, loop, off-topic)", False, True),
    SubMetric("proxy_empty", "no words", False, True),
    SubMetric("proxy_generic", "stock phrases only (< 3 other words)", False, True),
    SubMetric("proxy_repetitive", "repetition loop", False, True),
    SubMetric("proxy_off_topic", "cosine to the recent context below the threshold", False, True),
    SubMetric("context_similarity", "cosine(response, last 3 context turns)", higher_is_better=None),
]


def is_generic(text: str) -> bool:
    rest = _STOCK.sub(" ", normalize_text(text))
    return not is_empty(text) and len(words(rest)) < MIN_CONTENT_WORDS


def is_repetitive(text: str, threshold: float = 0.5) -> bool:
    """The metric's loop rule: repeated 3-grams above `threshold`, or one sentence said 3 or more times."""
    return sentence_repeats(text) >= MAX_SENTENCE_REPEATS or repeated_ngram_share(words(text), 3) > threshold


@register_metric("unhelpful_proxy")
def unhelpful_proxy(ctx: EvalContext) -> MetricOutput:
    recent = [" ".join(t.text for t in s.context[-CONTEXT_TURNS:]) for s in ctx.table.samples]
    context_vectors = ctx.embed(recent)
    scores = {}
    for model in ctx.table.models:
        texts = ctx.table.responses[model]
        similarity = np.einsum("ij,ij->i", ctx.embed(texts), context_vectors)
        empty = np.array([is_empty(t) for t in texts])
        generic = np.array([is_generic(t) for t in texts])
        loop = np.array([is_repetitive(t, ctx.settings.repetition_threshold) for t in texts])
        off_topic = ~empty & (similarity < ctx.settings.offtopic_threshold)
        flags = {"proxy_empty": empty, "proxy_generic": generic, "proxy_repetitive": loop, "proxy_off_topic": off_topic}
        per_context = {name: flag.astype(float) for name, flag in flags.items()}
        per_context["unhelpful_proxy"] = np.any(np.stack(list(flags.values())), axis=0).astype(float)
        per_context["context_similarity"] = np.where(empty, np.nan, similarity)
        scores[model] = ModelScores(per_context=per_context)
    info = {"offtopic_threshold": ctx.settings.offtopic_threshold, "stock_phrases": list(STOCK_PHRASES)}
    return MetricOutput(SUBMETRICS, scores, info)
