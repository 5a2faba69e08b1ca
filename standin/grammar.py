"""Generated recall content: key/value facts and pass keys, with a TRAIN grammar and a disjoint EVAL grammar.

A fact binds an entity (a made-up person name) and an attribute to a value. A fact row states the fact
once in a *statement frame* and later asks for it in a *question frame* that ends right before the value;
the model must bind entity + attribute across two different surface forms and copy the value.

Invariants (tested in tests/standin/test_grammar.py):
- Nothing the EVAL grammar produces can be produced by the TRAIN grammar: eval names are built from
  syllables that each hold one of the letters j, w, x, y, which no train syllable holds; eval
  attributes never occur (as whole words) inside a train attribute or frame; an eval frame rendered with
  *train* slot fillers is matched by no train frame pattern (so the frames differ in their literal text,
  not only in their fillers). The pass-key wording of the benchmark suite (megacontext/bench/tasks.py)
  and the demo's planted facts (megacontext/demo/input.py) are eval-only as well.
- A question never ends with the same words that precede the value in its statement (the last
  ``SURFACE_CHARS`` characters differ), so no fact is answerable by copying the statement's prefix.
- Values enter text as " " + value and are followed by a non-word character, so their BPE tokens are
  the same in the statement, the question's answer and a lone encoding of " " + value.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

SURFACE_CHARS = 10

# ---------------------------------------------------------------- names
_TRAIN_SYL = ("ka", "lo", "mer", "tan", "vis", "dor", "ul", "shi", "bre", "qua", "zen", "rok", "fa", "nim", "el",
              "gor", "pa", "ri", "sol", "ven", "mi", "tor", "bal", "ne", "sa", "dun", "ha", "lin", "cor", "te")
_TRAIN_TITLES = ("Captain", "Doctor", "Mrs", "Mr", "Professor", "Aunt", "Uncle", "Sister", "Judge", "Father")
_EVAL_SYL = ("jex", "wub", "oxi", "yph", "azy", "kwo", "ibj", "wen", "uvy", "jor", "pyx", "xil", "wam", "yel",
             "jun", "dax", "owy", "tej")
_EVAL_TITLES = ("Commander", "Baroness", "Inspector", "Reverend")

# ---------------------------------------------------------------- values
_WORDS_TRAIN = {
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "brown", "grey", "white", "black", "pink"),
    "fruit": ("apple", "pear", "plum", "cherry", "peach", "grape", "melon", "lemon", "apricot", "banana"),
    "job": ("baker", "tailor", "carpenter", "sailor", "weaver", "miller", "painter", "farmer", "clerk", "nurse"),
    "animal": ("fox", "badger", "otter", "hare", "wolf", "heron", "beaver", "falcon", "lynx", "moose"),
    "flower": ("rose", "tulip", "lily", "daisy", "violet", "poppy", "iris", "orchid", "lilac", "aster"),
    "instrument": ("violin", "flute", "cello", "harp", "trumpet", "drum", "piano", "guitar", "oboe", "banjo"),
    "metal": ("copper", "silver", "gold", "iron", "tin", "zinc", "nickel", "bronze", "lead", "brass"),
}
_WORDS_EVAL = {
    "gem": ("ruby", "emerald", "sapphire", "opal", "topaz", "garnet", "amber", "jade", "pearl", "onyx"),
    "spice": ("cinnamon", "nutmeg", "ginger", "saffron", "clove", "cumin", "pepper", "paprika", "anise"),
    "vegetable": ("carrot", "turnip", "cabbage", "onion", "leek", "radish", "parsnip", "spinach", "celery"),
}

# attribute -> value kind: "number" (3-6 digits), "name" (a made-up name), or a word-list key
TRAIN_ATTRIBUTES: dict[str, str] = {
    "room number": "number", "badge number": "number", "seat number": "number", "house number": "number",
    "ticket number": "number", "account number": "number", "lucky number": "number", "shoe size": "number",
    "phone extension": "number", "bus route": "number", "gate number": "number", "passport number": "number",
    "order number": "number", "table number": "number", "door code": "number", "serial number": "number",
    "platform number": "number", "case number": "number", "invoice number": "number",
    "membership number": "number",
    "dog": "name", "cat": "name", "horse": "name", "parrot": "name", "boat": "name", "best friend": "name",
    "teacher": "name", "landlord": "name", "cousin": "name", "doctor": "name", "lawyer": "name",
    "neighbour": "name",
    "favourite colour": "colour", "favourite fruit": "fruit", "profession": "job", "favourite animal": "animal",
    "favourite flower": "flower", "instrument": "instrument", "favourite metal": "metal",
}
EVAL_ATTRIBUTES: dict[str, str] = {
    "locker combination": "number", "library card number": "number", "parking space": "number",
    "bicycle lock code": "number",
    "goat": "name", "canary": "name", "godmother": "name", "barber": "name",
    "favourite gemstone": "gem", "favourite spice": "spice", "least liked vegetable": "vegetable",
}

# ---------------------------------------------------------------- frames ({E} entity, {A} attribute, {V} value)
TRAIN_STATEMENTS = (
    "{E}'s {A} is {V}.", "The {A} of {E} is {V}.", "We were told that the {A} of {E} was {V}.",
    "For the record, {E}'s {A} was {V}.", "{V} is the {A} of {E}.",
    "According to the register, {E} has the {A} {V}.", "Note: {A} for {E} = {V}.", "{E} ({A}: {V}).",
    "It turned out that {E}'s {A} was {V}.", "Everyone in town knew that {E}'s {A} was {V}.",
    "In the letter, {E} wrote that the {A} was {V}.", "{E} said: my {A} is {V}.",
    "A small note read: {E}, {A}, {V}.", "{V}, that is {E}'s {A}.", "The file on {E} gives the {A} as {V}.",
    "{E} once mentioned that the {A} was {V}.", "Remember that {E}'s {A} is {V}.",
    "By all accounts the {A} of {E} is {V}.", "Records show {E}'s {A}: {V}.",
)
TRAIN_QUESTIONS = (
    "Question: What is {E}'s {A}? Answer:", "What was the {A} of {E}? It was", "Q: {A} of {E}? A:",
    "Tell me the {A} for {E}. The {A} for {E} is", "If you remember, the {A} of {E} was",
    "{E}'s {A}? The answer is", "Which {A} does {E} have? {E} has", "Looking back, {E}'s {A} was",
    "The {A} that {E} has is", "Do you recall {E}'s {A}? It is", "Asked for the {A} of {E}, the clerk said",
    "Fill in: {E} / {A} /", "{E}, {A}:", "Answer with the {A} of {E}:",
)
EVAL_STATEMENTS = (
    "It is on record that the {A} belonging to {E} is {V}.", "Mark this down: {E} - {A} - {V}.",
    "For {E}, the {A} happens to be {V}.", "Nobody doubted that {V} was {E}'s {A}.",
    "The ledger lists {V} under {A}, beside the name {E}.",
)
EVAL_QUESTIONS = (
    "Here is a quick quiz. What {A} does {E} have? The right answer is", "So the {A} of {E} would be",
    "Please state {E}'s {A}:", "Remind me about {E}. Their {A}? Certainly, it is",
)

# ---------------------------------------------------------------- pass keys ({N} noun, {K} key)
TRAIN_KEY_NOUNS = ("access code", "secret code", "magic number", "vault password", "gate combination",
                   "key number", "PIN", "lock number", "special number", "entry code", "hidden number",
                   "code word number")
TRAIN_KEY_STATEMENTS = ("The {N} is {K}.", "Remember the {N}: {K}.", "Note that the {N} is {K}. Keep it in mind.",
                        "Here is the {N}: {K}.", "Do not forget it: the {N} is {K}.", "{K} is the {N}.",
                        "Write this down, the {N} is {K}.")
TRAIN_KEY_QUESTIONS = ("What is the {N}? The {N} is", "What was the {N} again? It was", "The {N} mentioned above is",
                       "Question: the {N}? Answer:", "Recall the {N}:", "The {N} is")
# the benchmark suite's wording (megacontext/bench/tasks.py), kept out of training
EVAL_KEY_STATEMENT = "The pass key is {K}. Remember it."
EVAL_KEY_QUESTION = "\nThe pass key is"
# the demo's planted facts (megacontext/demo/input.py): no training string may spell them out
DEMO_FACT_PREFIXES = ("The secret number of the captain's safe is", "The ship's cat was called",
                      "The treasure is buried under the")

# classic repeated filler for some pass-key rows
REPEAT_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


@dataclass(frozen=True)
class Grammar:
    """One side (train or eval) of the recall grammar."""

    syllables: tuple[str, ...]
    titles: tuple[str, ...]
    attributes: dict[str, str]
    words: dict[str, tuple[str, ...]]
    statements: tuple[str, ...]
    questions: tuple[str, ...]
    key_nouns: tuple[str, ...] = ()
    key_statements: tuple[str, ...] = ()
    key_questions: tuple[str, ...] = ()
    attr_names: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "attr_names", tuple(self.attributes))
        for f in self.statements:
            if "{V}" not in f or "{E}" not in f or "{A}" not in f:
                raise ValueError(f"statement frame {f!r} must hold {{E}}, {{A}} and {{V}}")
        for f in self.questions:
            if "{V}" in f or "{E}" not in f or "{A}" not in f:
                raise ValueError(f"question frame {f!r} must hold {{E}} and {{A}} and end before the value")

    # ------------------------------------------------------------ sampling
    def word(self, rng: random.Random, lo: int = 2, hi: int = 3) -> str:
        return "".join(rng.choice(self.syllables) for _ in range(rng.randint(lo, hi))).capitalize()

    def name(self, rng: random.Random) -> str:
        if rng.random() < 0.25:
            return f"{rng.choice(self.titles)} {self.word(rng)}"
        return f"{self.word(rng)} {self.word(rng)}"

    def value(self, kind: str, rng: random.Random) -> str:
        if kind == "number":
            digits = rng.randint(3, 6)
            return str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if kind == "name":
            return self.word(rng)
        return rng.choice(self.words[kind])

    def facts(self, k: int, rng: random.Random) -> list[tuple[str, str, str]]:
        """``k`` facts (entity, attribute, value) with distinct (entity, attribute) pairs. Half the rows
        reuse entities or attributes across facts, so the answer needs both the entity and the attribute."""
        shared = rng.random() < 0.5
        ents = [self.name(rng) for _ in range(max(1, k // 2) if shared else k)]
        out, seen = [], set()
        while len(out) < k:
            e, a = rng.choice(ents), rng.choice(self.attr_names)
            if (e, a) in seen:
                continue
            seen.add((e, a))
            out.append((e, a, self.value(self.attributes[a], rng)))
        return out

    def statement(self, fact: tuple[str, str, str], rng: random.Random) -> tuple[str, str]:
        """(frame, text) of a statement of ``fact``."""
        e, a, v = fact
        f = rng.choice(self.statements)
        return f, f.format(E=e, A=a, V=v)

    def question(self, fact: tuple[str, str, str], statement_frame: str, rng: random.Random) -> str:
        """A question for ``fact`` whose wording before the answer differs from the statement's."""
        e, a, v = fact
        before_value = statement_frame.split("{V}")[0].format(E=e, A=a).rstrip()[-SURFACE_CHARS:]
        choices = [q for q in self.questions if q.format(E=e, A=a).rstrip()[-SURFACE_CHARS:] != before_value]
        return rng.choice(choices).format(E=e, A=a)

    def passkey(self, key: str, rng: random.Random) -> tuple[str, str]:
        n = rng.choice(self.key_nouns)
        return rng.choice(self.key_statements).format(N=n, K=key), rng.choice(self.key_questions).format(N=n)


TRAIN = Grammar(_TRAIN_SYL, _TRAIN_TITLES, TRAIN_ATTRIBUTES, _WORDS_TRAIN, TRAIN_STATEMENTS, TRAIN_QUESTIONS,
                TRAIN_KEY_NOUNS, TRAIN_KEY_STATEMENTS, TRAIN_KEY_QUESTIONS)
EVAL = Grammar(_EVAL_SYL, _EVAL_TITLES, EVAL_ATTRIBUTES, {**_WORDS_TRAIN, **_WORDS_EVAL}, EVAL_STATEMENTS,
               EVAL_QUESTIONS)


# ---------------------------------------------------------------- "could the train grammar produce this?"
def _alt(options) -> str:
    return "(?:" + "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True)) + ")"


def train_slot_patterns() -> dict[str, str]:
    """Regular expressions of every string the TRAIN grammar can put in each slot."""
    word = "(?:" + _alt(s.capitalize() for s in _TRAIN_SYL) + _alt(_TRAIN_SYL) + "{1,2})"
    values = [r"\d{3,6}", word] + [_alt(ws) for ws in _WORDS_TRAIN.values()]
    return {
        "E": f"(?:{_alt(_TRAIN_TITLES)} {word}|{word} {word})",
        "A": _alt(TRAIN_ATTRIBUTES),
        "V": "(?:" + "|".join(values) + ")",
        "N": _alt(TRAIN_KEY_NOUNS),
        "K": r"\d+",
    }


def _frame_regex(frame: str, slots: dict[str, str]) -> re.Pattern:
    parts = re.split(r"(\{[EAVNK]\})", frame)
    return re.compile("".join(slots[p[1]] if re.fullmatch(r"\{[EAVNK]\}", p) else re.escape(p) for p in parts))


def train_patterns() -> list[re.Pattern]:
    """One compiled pattern per TRAIN frame (fact statements and questions, pass-key statements and questions)."""
    slots = train_slot_patterns()
    frames = TRAIN_STATEMENTS + TRAIN_QUESTIONS + TRAIN_KEY_STATEMENTS + TRAIN_KEY_QUESTIONS
    return [_frame_regex(f, slots) for f in frames]


def train_could_generate(text: str, patterns: list[re.Pattern] | None = None) -> bool:
    """Whether some TRAIN frame, filled with TRAIN slot values, renders exactly ``text``."""
    return any(p.fullmatch(text) for p in (patterns or train_patterns()))
