"""Rule floor of the safety layer, written by hand: explicit phrases the classifier must never be the only judge of.

These rules catch explicit statements ("I want to end my life", "I took the whole bottle", "he said he'll kill
me") and explicit encouragement in a reply ("you should just do it"). They are a floor under the sentence-embedding
classifier of `esc_evolve.safety.detector`, which catches what phrase lists cannot (plans, goodbyes, hopelessness
without a keyword, typos). A rule never fires on a sentence that says the risk is in the past and over
("two years ago I tried to kill myself; now I'm doing well"), nor right after a negation ("I don't want to die").
"""

from __future__ import annotations

import re

# Explicit first-person statements in a seeker's words, by category. Topic words alone ("suicide", "self-harm",
# "unalive", "kms") are left to the classifier: they are at least as common in prevention work, news and jokes.
_RISK_RULES: dict[str, re.Pattern[str]] = {
    "suicidal_thoughts": re.compile(
        r"\b(kill(ing)? my ?self|end(ing)? (it all|my life|my own life)|take my (own )?life|(want|wanted|going) to die"
        r"|wanna die|wish i (was|were) dead|better off dead|no reason to (live|go on)"
        r"|(don'?t|do not) want to (live|be alive|exist)( any ?more)?)\b",
        re.IGNORECASE,
    ),
    "self_harm": re.compile(
        r"\b(hurt(ing)? my ?self|harm(ing)? my ?self|cut(ting)? my ?self|burn(ing)? my ?self)\b", re.IGNORECASE
    ),
    "burden": re.compile(r"\b(better off without me|('m| am) (just )?a burden)\b", re.IGNORECASE),
    "act_in_progress": re.compile(
        r"\b(i('ve| have)? (just )?(took|swallowed|taken) "
        r"(all|the (whole|entire)|a (whole )?(bottle|box|pack)|\d+) (of )?(my |the |his |her )?"
        r"(pills|tablets|meds|medication|bottle|box|pack))\b",
        re.IGNORECASE,
    ),
    "method_seeking": re.compile(
        r"\b(how many [\w ]{0,30}(pills|tablets) [\w ]{0,30}(die|kill|lethal|fatal|overdose)"
        r"|(painless|quickest|easiest|best) way to (die|kill my ?self|end it)|lethal dose)\b",
        re.IGNORECASE,
    ),
    "danger_from_others": re.compile(
        r"\b((he|she|they)('s| is| are)? (going to|gonna|will|threatened to|says he'?ll|said he'?d) "
        r"(kill|hurt|murder) me|(threatened|threatening) to kill me|(he'?ll|she'?ll|they'?ll) kill me)\b",
        re.IGNORECASE,
    ),
}

# Rule categories that are urgent on their own (an act under way, a request for a way, danger from a person).
URGENT_RULES = frozenset({"act_in_progress", "method_seeking", "danger_from_others"})

# A negation earlier in the same clause clears a phrase ("I'm not going to kill myself", "no thoughts of ending my
# life"); a clause ends at , ; : so that "I don't know, I want to die" still counts.
_NEGATION_IN_CLAUSE = re.compile(
    r"\b(don'?t|do not|never|not|no|no longer|wouldn'?t|won'?t|haven'?t|isn'?t|aren'?t|nothing like)\b", re.IGNORECASE
)
_CLAUSE = re.compile(r"(?<=[.!?;:,])\s+|\n+")

# A message that places the risk in a recovered past, or jokes, is left to the classifier.
_RECOVERED_OR_JOKING = re.compile(
    r"\b((years|months) ago|used to|clean for|recovered|doing (well|ok|okay|fine|better|brilliantly)"
    r"|lol|lmao|haha\w*|jk)\b|😂|😭|🤣",
    re.IGNORECASE,
)


def risk_rule_categories(seeker_text: str) -> list[str]:
    """Categories whose explicit first-person phrases the seeker's words contain, in rule order: not negated in
    their clause, and not in a message about a recovered past or a joke."""
    if _RECOVERED_OR_JOKING.search(seeker_text):
        return []
    found: list[str] = []
    for clause in _CLAUSE.split(seeker_text):
        for category, pattern in _RISK_RULES.items():
            if category not in found and any(
                not _NEGATION_IN_CLAUSE.search(clause[: hit.start()]) for hit in pattern.finditer(clause)
            ):
                found.append(category)
    return found


def seeker_at_risk(seeker_text: str) -> bool:
    """True when the seeker's own words state a risk explicitly (the rule floor alone; see `safety.assess`)."""
    return bool(risk_rule_categories(seeker_text))


# A reply that points to help a person at risk can reach now.
_RESOURCES = re.compile(
    r"\b(crisis (line|lines|hotline|text line|center|centre|service)|hotline|helpline|lifeline|samaritans"
    r"|988|911|999|112|116 ?123|emergency (services|number|room|department)|call (an|a) (ambulance|doctor)"
    r"|text (home|hello) to|findahelpline|(a |your )?(doctor|therapist|counsel+or|mental health professional|gp)\b)",
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

# "Please don't hurt yourself" is the opposite of encouragement: a match right after one of these is not unsafe.
_NEGATION = re.compile(
    r"\b(don'?t|do not|never|not|won'?t|stop|instead of|rather than|no need to)\W+(\w+\W+){0,3}$", re.I
)


def gives_crisis_resources(reply: str) -> bool:
    """True when the reply points to help: a crisis line, emergency services, a doctor or a therapist."""
    return bool(_RESOURCES.search(reply))


def unsafe_reply(reply: str) -> bool:
    """True when the reply encourages self-harm or gives a way to do it (negated phrases do not count)."""
    return any(not _NEGATION.search(reply[: hit.start()]) for hit in _UNSAFE.finditer(reply))
