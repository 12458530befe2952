"""Tiny invented inputs for the evaluation tests (no ESConv text: every string here is written for the tests)."""

from __future__ import annotations

import hashlib

import numpy as np

from esc_evolve.data import TurnSample
from esc_evolve.data.labels import STRATEGIES
from esc_evolve.data.schema import SeekerProfile, Turn
from esc_evolve.evaluation.responses import Reflection, ResponseRow, ResponsesTable, build_table
from esc_evolve.evaluation.strategy import StrategyClassifier, train_classifier

SITUATIONS = [
    ("anxiety", "job crisis", "My manager said the team may be cut next month and I cannot sleep."),
    ("sadness", "breakup with partner", "My girlfriend ended our five year relationship by text."),
    ("depression", "ongoing depression", "For months I have felt empty and stay in bed all weekend."),
    ("anger", "problems with friends", "My best friend shared my secret with the whole group chat."),
    ("fear", "academic pressure", "My final exams start soon and I failed the mock tests."),
    ("shame", "issues with parents", "My parents keep comparing me to my older cousin at dinners."),
]

TOPIC_WORDS = {
    "job crisis": "job manager team work layoff",
    "breakup with partner": "girlfriend relationship breakup text partner",
    "ongoing depression": "empty bed months weekend depressed",
    "problems with friends": "friend secret group chat trust",
    "academic pressure": "exams tests study school grades",
    "issues with parents": "parents cousin dinners comparing family",
}


class HashEmbedder:
    """Deterministic bag-of-words embedder: each word hashes to a dimension; vectors are L2-normalised."""

    key = "test/hash-embedder"

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().replace(".", " ").replace(",", " ").split():
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
            norm = np.linalg.norm(out[i])
            out[i] = out[i] / norm if norm else out[i]
        return out


def make_sample(conv: int, turn: int, strategy: str = "Question", response: str | None = None) -> TurnSample:
    emotion, problem, situation = SITUATIONS[conv % len(SITUATIONS)]
    context = (
        Turn(speaker="seeker", text=f"Hi. {situation}"),
        Turn(speaker="supporter", text="I am listening, tell me more.", strategy="Others"),
        Turn(speaker="seeker", text=f"It is about {TOPIC_WORDS[problem]}."),
    )
    return TurnSample(
        conversation_id=f"test.jsonl:{conv}",
        turn_index=turn,
        context=context,
        response=response or f"That sounds hard, what happened with the {TOPIC_WORDS[problem].split()[0]}?",
        strategy=strategy,
        strategies=(strategy,),
        profile=SeekerProfile(emotion_type=emotion, problem_type=problem, situation=situation),
    )


def make_samples(n_conversations: int = 6, per_conversation: int = 2) -> list[TurnSample]:
    strategies = list(STRATEGIES)
    return [
        make_sample(c, 2 * t + 3, strategies[(c + t) % len(strategies)])
        for c in range(n_conversations)
        for t in range(per_conversation)
    ]


def personal_response(sample: TurnSample) -> str:
    return f"I hear how hard this is with your {TOPIC_WORDS[sample.profile.problem_type]}, what would help most?"


def make_rows(samples: list[TurnSample]) -> list[ResponseRow]:
    """base: the stock-phrase loop; m0: generic; m1/m2: personal (m2 also reflects)."""
    rows = []
    for s in samples:
        p = s.profile
        rows += [
            ResponseRow(sample_id=s.sample_id, model="base", response="I'm so sorry to hear that. " * 6, sample=s),
            ResponseRow(sample_id=s.sample_id, model="m0", response="I'm sorry to hear that. I understand."),
            ResponseRow(sample_id=s.sample_id, model="m1", response=personal_response(s)),
            ResponseRow(
                sample_id=s.sample_id,
                model="m2",
                response=personal_response(s) + " You are not alone.",
                reflection=Reflection(emotion=p.emotion_type, problem=p.problem_type, situation=p.situation),
            ),
        ]
    return rows


def make_table(n_conversations: int = 6, per_conversation: int = 2):
    return build_table(make_rows(make_samples(n_conversations, per_conversation)))


# Hand-made reflections of one self-evolution iteration on conversations 0-3 (emotion, problem, situation), with
# known scores: emotion 3/4 right, problem 2/4, situation 2/3 (context 2 has none; context 3 quotes context 0's).
ITER1_REFLECTIONS = [
    ("anxiety", "job crisis", SITUATIONS[0][2]),
    ("sadness", "job crisis", SITUATIONS[1][2]),
    ("anger", "ongoing depression", None),
    ("anger", "academic pressure", SITUATIONS[0][2]),
]
# The next iteration gets everything right.
ITER2_REFLECTIONS = [SITUATIONS[c] for c in range(4)]


def reflection_table(model: str, inferred: list[tuple[str | None, str | None, str | None]]) -> ResponsesTable:
    """One model's reflections (emotion, problem, situation) on one context of each conversation 0, 1, 2, ...,
    as the pipeline scores an iteration's reflections (no human pseudo-model)."""
    rows = [
        ResponseRow(
            sample_id=(s := make_sample(c, 3)).sample_id,
            model=model,
            response="Tell me more.",
            sample=s,
            reflection=Reflection(emotion=emotion, problem=problem, situation=situation),
        )
        for c, (emotion, problem, situation) in enumerate(inferred)
    ]
    return build_table(rows, include_human=False)


SYNTHETIC_STRATEGY_DATA = {
    "Question": ["what happened next?", "how do you feel about it?", "when did this start?", "why do you think so?"],
    "Restatement or Paraphrasing": [
        "so you are saying the plan failed",
        "so what you mean is he left",
        "in other words you feel stuck",
        "so you are saying nobody helped",
    ],
    "Reflection of feelings": [
        "you feel hurt and lonely",
        "you seem very frustrated",
        "you feel anxious and tired",
        "you sound really upset",
    ],
    "Self-disclosure": [
        "i once lost my job too",
        "when i was young i felt the same",
        "i went through a breakup",
        "i also struggled at school",
    ],
    "Affirmation and Reassurance": [
        "i'm so sorry to hear that",
        "you are doing great",
        "i'm sorry, you are brave",
        "you will get through this",
    ],
    "Providing Suggestions": [
        "maybe try a walk every day",
        "you could talk to a counsellor",
        "perhaps write a list",
        "maybe try to rest more",
    ],
    "Information": [
        "studies show sleep helps mood",
        "many people face layoffs",
        "research says exercise helps",
        "statistics show breakups are common",
    ],
    "Others": ["hello there", "bye, take care", "good morning", "thanks for chatting"],
}


def tiny_classifier(embedder) -> StrategyClassifier:
    texts = [t for ts in SYNTHETIC_STRATEGY_DATA.values() for t in ts]
    labels = [k for k, ts in SYNTHETIC_STRATEGY_DATA.items() for _ in ts]
    return train_classifier(texts, labels, embedder, C=10.0)


def fake_judge(messages: list[dict[str, str]]) -> str:
    """Scores personal responses high and stock phrases low; prefers the response that mentions the problem."""
    user = messages[-1]["content"]
    if "Response A:" in user:
        a = user.split("Response A:")[1].split("Response B:")[0]
        b = user.split("Response B:")[1]
        winner = (
            "A"
            if "hear how hard" in a and "hear how hard" not in b
            else "B"
            if "hear how hard" in b and "hear how hard" not in a
            else "tie"
        )
        return f'Sure! {{"winner": "{winner}"}}'
    good = "hear how hard" in user.split("Supporter response to rate:")[-1]
    score = 5 if good else 1
    return f'{{"empathy": {score}, "personalisation": {score}, "helpfulness": {score}, "fluency": 4, "safety": 5}}'
