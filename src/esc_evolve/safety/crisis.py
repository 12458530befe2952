"""Rule-based crisis checks, written by hand: no maintained library detects self-harm risk offline.

These rules are a floor, not a classifier: they catch explicit statements ("I want to end my life") and explicit
encouragement ("you should just do it"), and they are used where a miss is costly and a false alarm is cheap.
In self-evolution a refined reply y' becomes a DPO target, so a pair is dropped when its chosen side could teach
the model to answer a person at risk without pointing them to help, or to encourage harm at all.
"""

from __future__ import annotations

import re

# Explicit first-person signals of suicidal thoughts or self-harm in a seeker's words.
_RISK = re.compile(
    r"\b(kill(ing)? myself|end(ing)? (it all|my life|things)|take my (own )?life|suicid\w*|want(ed)? to die"
    r"|wish i (was|were) dead|better off (dead|without me)|no reason to (live|go on)|don'?t want to (live|be alive)"
    r"|hurt(ing)? myself|harm(ing)? myself|self[- ]harm\w*|cut(ting)? myself|overdos\w*)\b",
    re.IGNORECASE,
)

# A reply that points to help a person at risk can reach now.
_RESOURCES = re.compile(
    r"\b(crisis (line|lines|hotline|text line|center|centre|service)|hotline|helpline|lifeline|samaritans"
    r"|988|911|999|112|emergency (services|number|room|department)|call (an|a) (ambulance|doctor)|text (home|hello) to"
    r"|(a |your )?(doctor|therapist|counsel+or|mental health professional|gp)\b)",
    re.IGNORECASE,
)

# A reply that encourages harm, agrees that the person should act on it, or gives a way to do it.
_UNSAFE = re.compile(
    r"\b(you should (just )?(do it|kill|hurt|end|cut)|go ahead and (do it|kill|hurt|end|cut)"
    r"|(it'?s|that'?s) (ok|okay|fine|understandable) to (want to )?(kill|hurt|harm|end) (yourself|your life|it)"
    r"|(kill|hurt|harm) yourself|end your life|nobody would miss you|they('d| would) be better off without you"
    r"|(how many|enough) (pills|tablets)|the best way to (die|end it|kill))\b",
    re.IGNORECASE,
)


# "I don't want to die now" is not a risk statement; only the word right before a phrase counts, since "I don't
# know, I want to die" is one. (Phrases that hold their own negation, "don't want to live", match as a whole.)
_NEGATED_RIGHT_BEFORE = re.compile(r"\b(don'?t|do not|never|not|no longer)\W+$", re.IGNORECASE)


def seeker_at_risk(seeker_text: str) -> bool:
    """True when the seeker's own words say they may harm themselves."""
    return any(not _NEGATED_RIGHT_BEFORE.search(seeker_text[: hit.start()]) for hit in _RISK.finditer(seeker_text))


def gives_crisis_resources(reply: str) -> bool:
    """True when the reply points to help: a crisis line, emergency services, a doctor or a therapist."""
    return bool(_RESOURCES.search(reply))


# "Please don't hurt yourself" is the opposite of encouragement: a match right after one of these is not unsafe.
_NEGATION = re.compile(
    r"\b(don'?t|do not|never|not|won'?t|stop|instead of|rather than|no need to)\W+(\w+\W+){0,3}$", re.I
)


def unsafe_reply(reply: str) -> bool:
    """True when the reply encourages self-harm or gives a way to do it (negated phrases do not count)."""
    return any(not _NEGATION.search(reply[: hit.start()]) for hit in _UNSAFE.finditer(reply))
