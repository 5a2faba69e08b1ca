"""Demo input: a long, generated ship's log with facts planted early, and the questions that recall them.

No third-party prose is needed: sentences are assembled from small word lists written for this module,
with a seeded RNG, so the same seed gives the same text everywhere. The vocabulary of the planted facts
is disjoint from the filler's, so a fact's wording occurs exactly once before its question; that makes
"was the fact's block visible to the model?" a clean yes/no and lets the question's log-prob of the
answer measure recall.

A fact stands on a line of its own; its question is the same line's opening words ("The secret number of
the captain's safe is"), so question and fact match token for token, newline included; the answer is
the rest (" 7341."). Recall of an exact earlier continuation is in-context copying, which
even small models can do when the source is in view, and which no model can do when it is not.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_TIMES = ["At dawn", "In the morning", "Around noon", "Late in the afternoon", "At dusk", "During the night",
          "Before breakfast", "After supper", "At the change of the watch", "Shortly after sunrise"]
_CREW = ["the captain", "the first mate", "the cook", "the bosun", "the young deckhand", "the navigator",
         "the carpenter", "the old sailmaker", "the surgeon", "the helmsman", "two of the riggers"]
_VERBS = ["checked", "mended", "cleaned", "counted", "inspected", "carried", "stowed", "painted", "repaired",
          "tied down", "measured", "sorted"]
_OBJECTS = ["the ropes", "the water casks", "the spare sails", "the lanterns", "the anchor chain",
            "the biscuit barrels", "the charts", "the pumps", "the small boat", "the hatch covers",
            "the salted fish", "the tools"]
_PLACES = ["on the main deck", "below decks", "near the bow", "by the stern rail", "in the hold",
           "beside the mast", "in the galley", "on the quarterdeck"]
_WEATHER = ["The wind came from the north and the sea was calm.", "A grey rain fell for hours.",
            "The sky stayed clear and the waves were small.", "Fog hid the horizon until midday.",
            "A strong breeze filled the sails.", "The swell grew heavy towards evening.",
            "Clouds gathered in the west but no storm came.", "The air was warm and still."]
_REMARKS = ["Nobody complained.", "The work went slowly.", "Everyone was tired afterwards.",
            "It took longer than expected.", "The men sang while they worked.", "All was in good order.",
            "We made good progress.", "Some of the crew were seasick."]

# (question, answer): the fact sentence is question + answer; words chosen to be absent from the filler
FACTS: tuple[tuple[str, str], ...] = (
    ("The secret number of the captain's safe is", " 7341."),
    ("The ship's cat was called", " Biscuit."),
    ("The treasure is buried under the", " olive tree."),
)

# same-kind alternatives for the forced-choice recall (numbers are generated); all absent from the filler
_ALTERNATIVES: dict[str, tuple[str, ...]] = {
    " Biscuit.": tuple(f" {n}." for n in ("Pepper", "Whiskers", "Mittens", "Shadow", "Ginger", "Smudge", "Tiger",
                                          "Sooty", "Pickles", "Muffin", "Jasper", "Nutmeg")),
    " olive tree.": tuple(f" {n} tree." for n in ("oak", "apple", "fig", "pine", "lemon", "cherry", "palm",
                                                  "walnut", "chestnut", "willow", "cedar", "orange")),
}


@dataclass
class PlantedFact:
    question: str
    answer: str
    char_offset: int  # where the fact sentence starts in the text


def _sentence(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:
        return rng.choice(_WEATHER)
    if r < 0.25:
        return rng.choice(_REMARKS)
    return f"{rng.choice(_TIMES)}, {rng.choice(_CREW)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} " \
           f"{rng.choice(_PLACES)}."


def ships_log(approx_chars: int, seed: int = 0, fact_fractions: tuple[float, ...] = (0.02, 0.08, 0.15),
              facts: tuple[tuple[str, str], ...] = FACTS) -> tuple[str, list[PlantedFact]]:
    """A ship's log of about ``approx_chars`` characters with ``facts`` planted at the given fractions.

    Returns (text, planted facts with their character offsets). Entries are grouped into days."""
    if approx_chars < 200:
        raise ValueError(f"approx_chars={approx_chars} is too short for a log with planted facts (>= 200)")
    if len(fact_fractions) > len(facts):
        raise ValueError(f"{len(fact_fractions)} fact positions requested but only {len(facts)} facts exist")
    if any(not 0.0 <= f < 1.0 for f in fact_fractions):
        raise ValueError(f"fact_fractions={fact_fractions} must lie in [0, 1)")
    rng = random.Random(seed)
    targets = sorted((int(f * approx_chars), i) for i, f in enumerate(fact_fractions))
    parts: list[str] = []
    planted: list[PlantedFact] = []
    size, day = 0, 1
    while size < approx_chars:
        para = [f"Day {day}."]
        for _ in range(rng.randint(4, 8)):
            para.append(_sentence(rng))
        while targets and size >= targets[0][0]:
            _, i = targets.pop(0)
            question, answer = facts[i]
            body = " ".join(para)
            para = [body + "\n" + question + answer + "\n"]  # the fact on its own line
            planted.append(PlantedFact(question, answer, size + len(body) + 1))
        text = " ".join(para).rstrip(" ") + ("" if para[-1].endswith("\n") else "\n")
        parts.append(text)
        size += len(text)
        day += 1
    return "".join(parts), planted


def _core(answer: str) -> str:
    return answer.strip().rstrip(".")


def distractors(answer: str, text: str, k: int = 7, seed: int = 0) -> list[str]:
    """``k`` answers of the same kind as ``answer`` (formatted alike), none of which occurs in ``text``.

    Digit answers get other numbers with as many digits; the others draw from a fixed per-fact list.
    Deterministic in ``seed``; raises when fewer than ``k`` usable alternatives exist."""
    rng = random.Random(f"{seed}:{answer}")
    core = _core(answer)

    def absent(cand: str) -> bool:
        return cand != answer and re.search(rf"\b{re.escape(_core(cand))}\b", text, re.IGNORECASE) is None

    if core.isdigit():
        lo, hi = 10 ** (len(core) - 1), 10 ** len(core) - 1
        out: list[str] = []
        while len(out) < k:
            cand = answer.replace(core, str(rng.randint(lo, hi)))
            if absent(cand) and cand not in out:
                out.append(cand)
        return out
    if answer not in _ALTERNATIVES:
        raise ValueError(f"no alternatives known for answer {answer!r}; known: {sorted(_ALTERNATIVES)}")
    pool = [c for c in _ALTERNATIVES[answer] if absent(c)]
    if len(pool) < k:
        raise ValueError(f"only {len(pool)} alternatives to {answer!r} are absent from the text, need {k}")
    return rng.sample(pool, k)
