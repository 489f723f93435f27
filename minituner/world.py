"""The world: a small synthetic world in plain English, and every task built from it.

No data set may be downloaded and no text written by others is copied in, so the course's
data comes from a world generated from a seed. Because the project generates it, every task
has an exact answer and every chapter can report a real before/after number.

The rules of the world (what a model trained on it should learn)
-----------------------------------------------------------------
* **People.** ``World(seed)`` draws 60 people (fewer with ``n_people=``), each with a unique
  first name that fixes the pronoun (she/her or he/him/his), and exactly one of each:
  an age (20-79), a home town, a favourite color, a pet (one animal), a job, a best friend
  (another person; friendship is not necessarily mutual), and two kinds of objects with a
  color and a count (1-9), e.g. "Ada has three red cups". These never change.
* **Towns.** 12 towns; each lies somewhere (by the sea, in the hills, ...) and is known for
  one landmark (its market, bridge, library, ...). A person's town's landmark is "the
  market" in their stories.
* **Corpus** (``World.corpus``): documents of six kinds -- profiles of a person, town
  descriptions, stories of a person's day, comparisons of two people, small sums told as
  events, and dialogues where people ask each other about themselves. Every fact is told
  with several templates (clause order, relative clauses, pronouns, digits or words for
  numbers), so a model has to learn the language and the facts, not one template.
* **Days** (``World.classification``): a short story of 3-5 events in a person's day. An
  event is good (+1: finding, winning, receiving, a lunch with a friend ...), bad (-1:
  losing, breaking, missing the bus ...) or ordinary (0: feeding the pet, reading ...).
  Negation flips it: a hoped-for good thing that did not happen counts as bad ("hoped to win
  a prize, but did not"), and a bad thing narrowly avoided counts as good ("almost lost her
  keys, but found them in time"). The label is the sign of the sum: ``good`` if > 0,
  ``bad`` if < 0, ``neutral`` if 0. Classes are balanced. No single word decides the label.
* **Instructions** (``World.instructions``): 11 families (``INSTRUCTION_FAMILIES``);
  ``comparison`` and ``negation`` (``HELD_OUT_FAMILIES``) appear only in the test split, to
  measure how well instruction tuning generalizes to instructions never seen in training.
  Answers are short (a word, a number, a list or a sentence) and exact.
* **Preferences** (``World.preferences``): a prompt, a correct and concise ``chosen`` answer
  and a ``rejected`` one that is either wrong (a plausible distractor) or verbose (the right
  answer wrapped in filler). ``judge`` scores any answer by that rule.
* **Splits.** An item's split is a fixed function of its content (``_is_test``: a CRC32 of
  the seed and the item's key), so no test prompt, story or fact question can ever appear in
  a training split: e.g. if "How old is Ada?" is a test fact, every phrasing of it is test.

Everything is deterministic from the seed (``random.Random`` streams named by seed and
purpose; no global state) and generates in seconds.

The world spans four files, each readable alone; this module re-exports what the other three
define, so ``from minituner.world import ...`` is the one import a chapter needs:
``lexicon.py`` (the words and sentence templates, ``CLASS_NAMES``, ``INSTRUCTION_FAMILIES``),
``prompts.py`` (``format_prompt``, ``format_chat``, ``DEFAULT_SYSTEM``) and ``scoring.py``
(the evaluators ``evaluate_classification``, ``exact_match``/``normalize``,
``evaluate_instructions``, ``judge``, ``win_rate``).
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Callable

from .lexicon import (BAD, CLASS_NAMES, COLORS, DAYS, EVENTS, FEMALE, GOOD, HELD_OUT_FAMILIES,
                      INSTRUCTION_FAMILIES, JOBS, LANDMARKS, MALE, NOT_BAD, NOT_GOOD, NUMBER_WORDS,
                      OBJECTS, ORDINARY, OUTCOME, PETS, TERRAINS, TIMES, TOWNS, VERBOSE, VERBS,
                      article, cap, join_words, number, things)
from .prompts import DEFAULT_SYSTEM, format_chat, format_prompt
from .scoring import (evaluate_classification, evaluate_instructions, exact_match, judge, normalize,
                      win_rate)

# What `from minituner.world import ...` offers: the generators defined here, and the names
# of lexicon.py, prompts.py and scoring.py that chapters use, re-exported.
__all__ = [
    "World", "Person", "Town", "SPLITS", "TEST_PERCENT",
    # lexicon.py
    "FEMALE", "MALE", "TOWNS", "TERRAINS", "LANDMARKS", "COLORS", "PETS", "JOBS", "OBJECTS",
    "NUMBER_WORDS", "DAYS", "TIMES", "VERBS", "CLASS_NAMES", "INSTRUCTION_FAMILIES",
    "HELD_OUT_FAMILIES", "GOOD", "NOT_GOOD", "BAD", "NOT_BAD", "ORDINARY", "EVENTS", "OUTCOME",
    "VERBOSE",
    # prompts.py
    "DEFAULT_SYSTEM", "format_chat", "format_prompt",
    # scoring.py
    "normalize", "exact_match", "evaluate_classification", "evaluate_instructions", "judge",
    "win_rate",
]

SPLITS = ("train", "test")
TEST_PERCENT = 20  # share of item keys that belong to the test split


@dataclass(frozen=True)
class Town:
    """A town: where it lies (one of TERRAINS) and what it is known for (one of LANDMARKS)."""
    name: str
    terrain: str
    landmark: str


@dataclass(frozen=True)
class Person:
    """One person's fixed facts; ``he``/``his``/``him`` give the pronouns for templates."""
    name: str
    female: bool
    age: int
    town: str
    color: str
    pet: str
    job: str
    friend: str
    objects: tuple[tuple[int, str, int], ...]  # (index into OBJECTS, color, count)

    @property
    def he(self) -> str:
        return "she" if self.female else "he"

    @property
    def his(self) -> str:
        return "her" if self.female else "his"

    @property
    def him(self) -> str:
        return "her" if self.female else "him"


# ------------------------------------------------------------------------------ splits
def _is_test(seed: int, key: str) -> bool:
    """The split of an item is a fixed function of its content: no key is in both splits."""
    return zlib.crc32(f"{seed}|{key}".encode()) % 100 < TEST_PERCENT


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class World:
    """A seeded synthetic world. ``World(seed=0)`` draws the people and towns; the methods
    generate the corpus and the tasks from seeded streams, so equal seeds give equal data."""

    def __init__(self, seed: int = 0, n_people: int = 60) -> None:
        if not 2 <= n_people <= len(FEMALE) + len(MALE):
            raise ValueError(f"n_people must be in [2, {len(FEMALE) + len(MALE)}], got {n_people}")
        self.seed = seed
        rng = random.Random(f"{seed}/world")
        self.towns = tuple(Town(t, rng.choice(TERRAINS), rng.choice(LANDMARKS)) for t in TOWNS)
        names = rng.sample([(n, True) for n in FEMALE] + [(n, False) for n in MALE], n_people)
        people = []
        for i, (name, female) in enumerate(names):
            friend = names[(i + rng.randrange(1, n_people)) % n_people][0]
            objs = tuple((o, rng.choice(COLORS), rng.randint(1, 9))
                         for o in rng.sample(range(len(OBJECTS)), 2))
            people.append(Person(name, female, rng.randint(20, 79), rng.choice(TOWNS),
                                 rng.choice(COLORS), rng.choice(PETS), rng.choice(JOBS),
                                 friend, objs))
        self.people = tuple(people)
        self.person = {p.name: p for p in self.people}
        self.town = {t.name: t for t in self.towns}

    def _rng(self, *purpose: object) -> random.Random:
        return random.Random("/".join([str(self.seed), *map(str, purpose)]))

    # ----------------------------------------------------------------- facts as language
    def _predicates(self, rng: random.Random, p: Person, kind: str) -> list[str]:
        """Ways to say one fact about p after a subject ('lives in Ashford')."""
        if kind == "town":
            return [f"lives in {p.town}", f"lives in the town of {p.town}",
                    f"has a home in {p.town}", f"comes from {p.town}"]
        if kind == "age":
            a = number(rng, p.age)
            return [f"is {a} years old", f"is {a}", f"turned {a} this year"]
        if kind == "color":
            return [f"likes {p.color} best", f"loves the color {p.color}",
                    f"has {p.color} as {p.his} favourite color"]
        if kind == "pet":
            return [f"has a {p.pet}", f"keeps a {p.pet} at home", f"owns a {p.pet}",
                    f"lives with a {p.pet}"]
        if kind == "job":
            return [f"works as a {p.job}", f"is a {p.job}", f"earns a living as a {p.job}"]
        if kind == "friend":
            return [f"is a good friend of {p.friend}", f"is friends with {p.friend}",
                    f"spends a lot of time with {p.friend}, {p.his} best friend"]
        o, c, n = p.objects[int(kind[-1])]
        return [f"owns {things(rng, n, c, o)}", f"has {things(rng, n, c, o)}",
                f"keeps {things(rng, n, c, o)} at home"]

    def _whole(self, rng: random.Random, p: Person, kind: str, who: str, whose: str) -> list[str]:
        """Sentences that do not start with the subject ('Red is Ada's favourite color.')."""
        out = {
            "town": [f"{whose} home town is {p.town}.", f"{p.town} is where {who} lives."],
            "age": [f"{whose} age is {number(rng, p.age)}."],
            "color": [f"{whose} favourite color is {p.color}.",
                      f"Of all the colors, {who} likes {p.color} best."],
            "pet": [f"{whose} pet is a {p.pet}."],
            "job": [f"By trade, {who} is a {p.job}.", f"{whose} work is the work of a {p.job}."],
            "friend": [f"{whose} best friend is {p.friend}."],
        }.get(kind)
        if out is None:
            o, c, n = p.objects[int(kind[-1])]
            out = [f"In {whose} house there {'is' if n == 1 else 'are'} {things(rng, n, c, o)}."]
        return [cap(s) for s in out]

    def _profile(self, rng: random.Random) -> str:
        p = rng.choice(self.people)
        kinds = ["town", "age", "color", "pet", "job", "friend", "obj0", "obj1"]
        rng.shuffle(kinds)
        kinds = kinds[: rng.randint(3, 8)]
        out = [rng.choice((f"This is about {p.name}.", f"Let me tell you about {p.name}.",
                           f"Here is what we know about {p.name}.", ""))]
        named = False
        while kinds:
            who = p.name if not named or rng.random() < 0.25 else p.he
            whose = p.name + "'s" if who == p.name else p.his
            named = True
            r = rng.random()
            if r < 0.2:
                out.append(rng.choice(self._whole(rng, p, kinds.pop(), who, whose)))
            elif r < 0.45 and len(kinds) >= 2:
                a, b = rng.choice(self._predicates(rng, p, kinds.pop())), \
                    rng.choice(self._predicates(rng, p, kinds.pop()))
                if who == p.name and rng.random() < 0.5:
                    out.append(f"{p.name}, who {a}, {b}.")
                else:
                    out.append(f"{cap(who)} {a} and {b}.")
            else:
                out.append(f"{cap(who)} {rng.choice(self._predicates(rng, p, kinds.pop()))}.")
        return " ".join(s for s in out if s)

    def _town_doc(self, rng: random.Random) -> str:
        t = rng.choice(self.towns)
        res = [p for p in self.people if p.town == t.name]
        out = [rng.choice((f"{t.name} is a town {t.terrain}.", f"{t.name} lies {t.terrain}.",
                           f"The town of {t.name} is {t.terrain}.")),
               rng.choice((f"It is known for its {t.landmark}.",
                           f"The {t.landmark} is the pride of {t.name}.",
                           f"People come from far away to see the {t.landmark} of {t.name}."))]
        if not res:
            out.append(f"Nobody we know lives in {t.name}.")
        else:
            names = [p.name for p in res]
            rng.shuffle(names)
            k = len(names)
            out.append(rng.choice((f"{join_words(names)} {'lives' if k == 1 else 'live'} there.",
                                   f"{cap(number(rng, k))} of the people we know "
                                   f"{'lives' if k == 1 else 'live'} in {t.name}: {join_words(names)}.")))
            for p in rng.sample(res, min(len(res), 2)):
                out.append(f"{p.name} {rng.choice(self._predicates(rng, p, rng.choice(('job', 'pet', 'age'))))}.")
        return " ".join(out)

    def _event(self, rng: random.Random, p: Person, value_group: tuple[int, tuple[str, ...]]) -> str:
        o, _, _ = p.objects[rng.randrange(2)]  # one of p's own objects, for {objs}
        other = rng.randrange(len(OBJECTS))
        k = rng.randint(2, 5)
        return rng.choice(value_group[1]).format(
            he=p.he, his=p.his, him=p.him, friend=p.friend, town=rng.choice(TOWNS),
            place=self.town[p.town].landmark, pet=p.pet, a_color=article(rng.choice(COLORS)),
            thing=f"{article(rng.choice(COLORS))} {OBJECTS[other][0]}",
            things=f"{number(rng, k)} {rng.choice(COLORS)} {OBJECTS[other][1]}",
            objs=OBJECTS[o][1])

    def _story(self, rng: random.Random, target: str | None = None) -> tuple[str, str, Person]:
        """A day of 3-5 events; returns (text, label, person). ``target`` forces the label."""
        p = rng.choice(self.people)
        while True:
            groups = [rng.choice(EVENTS) for _ in range(rng.randint(3, 5))]
            total = sum(g[0] for g in groups)
            label = CLASS_NAMES[(total > 0) - (total < 0) + 1]
            if target is None or label == target:
                break
        times = sorted(rng.sample(range(len(TIMES)), len(groups)))
        out = [rng.choice((f"It was {rng.choice(DAYS)} in {p.town}.",
                           f"This is the story of {p.name}'s day.",
                           f"{p.name} woke up early in {p.town}.",
                           f"On {rng.choice(DAYS)}, {p.name} stayed in {p.town}."))]
        first = True
        i = 0
        while i < len(groups):
            who = p.name if first or rng.random() < 0.2 else p.he
            first = False
            when = TIMES[times[i]]
            e = self._event(rng, p, groups[i])
            if i + 1 < len(groups) and rng.random() < 0.3:
                e2 = self._event(rng, p, groups[i + 1])
                out.append(f"{when}, {who} {e}, and then {p.he} {e2}.")
                i += 2
                continue
            r = rng.random()
            if r < 0.5:
                out.append(f"{when}, {who} {e}.")
            elif r < 0.7:
                out.append(f"{cap(who)} {e} {when.lower()}.")
            else:
                out.append(f"{cap(who)} {e}.")
            i += 1
        return " ".join(out).replace(" , ", ", "), label, p

    def _comparison_doc(self, rng: random.Random) -> str:
        a, b = rng.sample(self.people, 2)
        old, young = (a, b) if a.age > b.age else (b, a)
        out = [rng.choice((f"{a.name} is {number(rng, a.age)} and {b.name} is {number(rng, b.age)}.",
                           f"{a.name} is {a.age} years old, while {b.name} is {b.age}."))]
        if a.age == b.age:
            out.append(f"So {a.name} and {b.name} are the same age.")
        else:
            out.append(rng.choice((f"So {old.name} is older than {young.name}.",
                                   f"That makes {young.name} younger than {old.name}.",
                                   f"{old.name} is the older of the two.")))
        if a.town == b.town:
            out.append(f"Both of them live in {a.town}.")
        else:
            out.append(f"{a.name} lives in {a.town}, but {b.name} lives in {b.town}.")
        out.append(f"{a.name} likes {a.color}, and {b.name} likes {b.color}." if a.color != b.color
                   else f"They both like {a.color} best.")
        return " ".join(out)

    def _sum_doc(self, rng: random.Random) -> str:
        p = rng.choice(self.people)
        o, _, n = p.objects[rng.randrange(2)]
        sing, plur = OBJECTS[o]
        if rng.random() < 0.5:
            k = rng.randint(1, 9)
            return (f"{p.name} had {number(rng, n)} {plur}. {p.friend} gave {p.him} {number(rng, k)} "
                    f"more, so now {p.he} has {number(rng, n + k)} {plur}. "
                    f"{cap(NUMBER_WORDS[n])} plus {NUMBER_WORDS[k]} is {NUMBER_WORDS[n + k]}.")
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        hi, lo = max(a, b), min(a, b)
        return rng.choice((f"If you add {a} and {b}, you get {a + b}.",
                           f"{hi} minus {lo} is {hi - lo}.",
                           f"{cap(number(rng, hi))} take away {number(rng, lo)} leaves {hi - lo}.",
                           f"{a} and {b} make {a + b} together.")) + " " + \
            f"{p.name} knows that {p.he} has {number(rng, n)} {plur if n > 1 else sing}."

    def _dialogue(self, rng: random.Random) -> str:
        p = rng.choice(self.people)
        q = self.person[p.friend]
        lines = [(f'"Where do you live, {p.name}?" asked {q.name}.', f'"I live in {p.town}," said {p.name}.'),
                 (f'"How old are you?" asked {q.name}.', f'"I am {p.age}," {p.he} said.'),
                 (f'"What is your job?" {q.name} asked.', f'"I am a {p.job}," said {p.name}.'),
                 (f'"Which color do you like best?" asked {q.name}.', f'"{cap(p.color)}," said {p.name}.'),
                 (f'"Do you have a pet?" asked {q.name}.', f'"Yes, I have a {p.pet}," said {p.name}.')]
        return " ".join(" ".join(pair) for pair in rng.sample(lines, rng.randint(2, 4)))

    # ------------------------------------------------------------------------- the corpus
    def corpus(self, split: str = "train", n_docs: int | None = None) -> list[str]:
        """Documents for pre-training (``split="train"``, default 30 000 documents, about
        11 M characters, about 3 M tokens) or held-out evaluation (``split="val"``, default
        1 000). Both state the same world's facts, drawn from different random streams; a
        document's split is a function of its text, so no document is in both."""
        if split not in ("train", "val"):
            raise ValueError(f"corpus split must be 'train' or 'val', got {split!r}")
        n_docs = n_docs if n_docs is not None else (30_000 if split == "train" else 1_000)
        if n_docs < 1:
            raise ValueError(f"n_docs must be >= 1, got {n_docs}")
        rng = self._rng("corpus", split)
        kinds: list[tuple[float, Callable[[random.Random], str]]] = [
            (0.3, self._profile), (0.08, self._town_doc), (0.3, self._story_doc),
            (0.12, self._comparison_doc), (0.1, self._sum_doc), (0.1, self._dialogue)]
        weights = [w for w, _ in kinds]
        docs: list[str] = []
        while len(docs) < n_docs:
            # a document is 1-3 paragraphs of the same or different kinds
            parts = [rng.choices(kinds, weights)[0][1](rng) for _ in range(rng.randint(1, 3))]
            doc = "\n\n".join(parts)
            if _is_test(self.seed, "doc/" + doc) == (split == "val"):  # no doc in both splits
                docs.append(doc)
        return docs

    def _story_doc(self, rng: random.Random) -> str:
        text, label, p = self._story(rng)
        if rng.random() < 0.5:
            text += " " + rng.choice(OUTCOME[label]).format(name=p.name)
        return text

    # ---------------------------------------------------------------- the classification
    def classification(self, split: str = "train", n: int | None = None) -> list[dict]:
        """Stories of a day labelled by their outcome: ``{"text", "label"}`` with ``label``
        an index into ``CLASS_NAMES`` (bad, neutral, good), balanced. Default sizes: 6 000
        train, 1 200 test."""
        _check_split(split)
        n = n if n is not None else (6_000 if split == "train" else 1_200)
        rng = self._rng("classification", split)
        out, seen = [], set()
        while len(out) < n:
            target = CLASS_NAMES[len(out) % 3]
            text, label, _ = self._story(rng, target)
            if text in seen or _is_test(self.seed, "story/" + text) != (split == "test"):
                continue
            seen.add(text)
            out.append({"text": text, "label": CLASS_NAMES.index(label)})
        rng.shuffle(out)
        return out

    # ---------------------------------------------------------------- instruction families
    # Each family returns (key, instruction, input, output, wrong): the key decides the split,
    # ``wrong`` is a plausible wrong answer (used for the rejected side of preference pairs).
    def _sentence(self, rng: random.Random) -> tuple[Person, str, tuple[str, str, str], str]:
        """A simple present-tense sentence: (person, subject, verb forms, object)."""
        p = rng.choice(self.people)
        pres, base, past, kind = rng.choice(VERBS)
        obj = {"place": f"the {self.town[p.town].landmark}", "friend": p.friend,
               "thing": f"{article(rng.choice(COLORS))} {rng.choice(OBJECTS)[0]}", "color": p.color,
               "pet": f"{p.his} {p.pet}", "text": rng.choice(("a book", "a letter", "the news"))}[kind]
        return p, p.name, (pres, base, past), obj

    def _i_arithmetic(self, rng: random.Random) -> tuple[str, str, str, str, str]:
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            r = a * b
        else:
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            if op == "-":
                a, b = max(a, b), min(a, b)
            r = a + b if op == "+" else a - b
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        verb = {"+": "Add the two numbers.", "-": "Subtract the second number from the first.",
                "*": "Multiply the two numbers."}[op]
        instr, inp = rng.choice(((f"What is {a} {word} {b}?", ""), (verb, f"{a} and {b}"),
                                 ("Compute the result.", f"{a} {op} {b}"),
                                 ("Give only the number that answers the sum.", f"{a} {word} {b}")))
        return f"arith/{a}{op}{b}", instr, inp, str(r), str(r + rng.choice((1, 2)) if r < 3 else r + rng.choice((-2, -1, 1, 2)))

    def _i_fact(self, rng: random.Random) -> tuple[str, str, str, str, str]:
        p = rng.choice(self.people)
        N = p.name
        j = rng.randrange(2)
        o, c, n = p.objects[j]
        sing, plur = OBJECTS[o]
        kind = rng.choice(("town", "age", "color", "pet", "job", "friend", "count", "objcolor"))
        other = lambda pool, x: rng.choice([v for v in pool if v != x])  # noqa: E731
        qs, ans, wrong = {
            "town": ([f"Where does {N} live?", f"In which town does {N} live?",
                      f"What is {N}'s home town?"], p.town, other(TOWNS, p.town)),
            "age": ([f"How old is {N}?", f"What is {N}'s age?"], str(p.age),
                    str(p.age + rng.choice((-3, -2, -1, 1, 2, 3)))),
            "color": ([f"What is {N}'s favourite color?", f"Which color does {N} like best?"],
                      p.color, other(COLORS, p.color)),
            "pet": ([f"What pet does {N} have?", f"What kind of animal is {N}'s pet?"], p.pet,
                    other(PETS, p.pet)),
            "job": ([f"What is {N}'s job?", f"What does {N} do for a living?"], p.job,
                    other(JOBS, p.job)),
            "friend": ([f"Who is {N}'s best friend?", f"Who is the best friend of {N}?"],
                       p.friend, other([q.name for q in self.people if q.name != N], p.friend)),
            "count": ([f"How many {plur} does {N} have?", f"How many {plur} does {N} own?"],
                      str(n), str(n + 1 if n < 5 else n - 1)),
            "objcolor": ([f"What color are {N}'s {plur}?" if n > 1 else f"What color is {N}'s {sing}?"],
                         c, other(COLORS, c)),
        }[kind]
        q = rng.choice(qs)
        instr, inp = rng.choice(((q, ""), ("Answer the question about the world.", q),
                                 ("Answer in one word.", q)))
        return f"fact/{N}/{kind}/{o if kind in ('count', 'objcolor') else ''}", instr, inp, ans, wrong

    def _i_counting(self, rng: random.Random) -> tuple[str, str, str, str, str]:
        sub = rng.randrange(3)
        pool = rng.choice((COLORS, PETS, TOWNS))
        if sub == 0:
            w = rng.choice(pool)
            items = [rng.choice(pool) for _ in range(rng.randint(3, 8))]
            inp, r = ", ".join(items), items.count(w)
            instr = rng.choice((f'How many times does the word "{w}" appear in the list?',
                                f"Count how often {w} appears in the list."))
        elif sub == 1:
            items = rng.sample(pool, rng.randint(2, min(9, len(pool))))
            inp, r = ", ".join(items), len(items)
            instr = rng.choice(("Count the items in the list.", "How many items are in the list?"))
        else:
            _, s, (pres, _, _), obj = self._sentence(rng)
            inp = f"{s} {pres} {obj}."
            r = len(inp.split())
            instr = rng.choice(("How many words are in the sentence?", "Count the words in the sentence."))
        return f"count/{instr}/{inp}", instr, inp, str(r), str(r + 1 if r < 2 else r + rng.choice((-1, 1)))

    def _i_sorting(self, rng: random.Random) -> tuple[str, str, str, str, str]:
        sub = rng.randrange(3)
        if sub < 2:
            items = [str(x) for x in rng.sample(range(100), rng.randint(3, 6))]
            out = sorted(items, key=int, reverse=sub == 1)
            instr = rng.choice((("Sort the numbers from smallest to largest.",
                                 "Put these numbers in increasing order."),
                                ("Sort the numbers from largest to smallest.",
                                 "Put these numbers in decreasing order."))[sub])
        else:
            items = rng.sample(rng.choice((COLORS, PETS, JOBS, FEMALE + MALE)), rng.randint(3, 5))
            out = sorted(items)
            instr = rng.choice(("Sort the words in alphabetical order.",
                                "Put these words in alphabetical order."))
        wrong = list(out)
        k = rng.randrange(len(wrong) - 1)
        wrong[k], wrong[k + 1] = wrong[k + 1], wrong[k]
        inp = ", ".join(items)
        return f"sort/{instr}/{inp}", instr, inp, ", ".join(out), ", ".join(wrong)

    def _i_reversing(self, rng: random.Random) -> tuple[str, str, str, str, str]:
        if rng.random() < 0.5:
            items = rng.sample(rng.choice((COLORS, PETS, TOWNS, JOBS)), rng.randint(3, 6))
            sep, instr = " ", rng.choice(("Reverse the order of the words.",
                                          "Write the words in the opposite order."))
        else:
            items = [str(rng.randrange(100)) for _ in range(rng.randint(3, 6))]
            sep, instr = ", ", rng.choice(("Write the list backwards.", "Reverse the list."))
        inp, out = sep.join(items), sep.join(items[::-1])
        wrong = inp if inp != out else sep.join(items[1:] + items[:1])
        return f"rev/{instr}/{inp}", instr, inp, out, wrong

    def _i_past_tense(self, rng: random.Random) -> tuple[str, str, str, str, str]:
        p, s, (pres, _, past), obj = self._sentence(rng)
        if rng.random() < 0.2:
            inp, out = f"{s} is a {p.job}.", f"{s} was a {p.job}."
        else:
            inp, out = f"{s} {pres} {obj}.", f"{s} {past} {obj}."
        instr = rng.choice(("Rewrite the sentence in the past tense.",
                            "Change the sentence to the past tense.",
                            "Put this sentence in the past tense."))
        return f"past/{inp}", instr, inp, out, inp

    def _i_yes_no(self, rng: random.Random) -> tuple[str, str, str, str, str]:
        p = rng.choice(self.people)
        N = p.name
        truth = rng.random() < 0.5
        pick = lambda pool, x: x if truth else rng.choice([v for v in pool if v != x])  # noqa: E731
        attr = rng.choice(("town", "job", "pet", "color", "age", "friend"))
        if attr == "age":
            k = rng.choice([k for k in range(20, 80, 5) if k != p.age])
            q, value, ans = f"Is {N} older than {k}?", str(k), p.age > k
        else:
            pool = {"town": TOWNS, "job": JOBS, "pet": PETS, "color": COLORS,
                    "friend": [q.name for q in self.people if q.name != N]}[attr]
            value = pick(pool, getattr(p, attr))
            q = {"town": f"Does {N} live in {value}?", "job": f"Is {N} a {value}?",
                 "pet": f"Does {N} have a {value}?", "color": f"Is {N}'s favourite color {value}?",
                 "friend": f"Is {value} {N}'s best friend?"}[attr]
            ans = value == getattr(p, attr)
        instr, inp = rng.choice((("Answer yes or no.", q), (q + " Answer yes or no.", ""),
                                 ("Say yes or no.", q)))
        return f"yn/{N}/{attr}/{value}", instr, inp, "yes" if ans else "no", "no" if ans else "yes"

    def _i_extremum(self, rng: random.Random) -> tuple[str, str, str, str, str]:
        items = rng.sample(range(100), rng.randint(3, 7))
        big = rng.random() < 0.5
        r = max(items) if big else min(items)
        instr = rng.choice(("Which number is the largest?", "What is the biggest number in the list?")
                           if big else ("Which number is the smallest?",
                                        "What is the smallest number in the list?"))
        inp = ", ".join(map(str, items))
        return f"ext/{instr}/{inp}", instr, inp, str(r), str(rng.choice([x for x in items if x != r]))

    def _i_day_outcome(self, rng: random.Random) -> tuple[str, str, str, str, str]:
        text, label, p = self._story(rng, rng.choice(CLASS_NAMES))
        instr = rng.choice((f"Was it a good, bad or neutral day for {p.name}? Answer with one word.",
                            "Read the story and say if the day was good, bad or neutral."))
        return "story/" + text, instr, text, label, rng.choice([c for c in CLASS_NAMES if c != label])

    def _i_comparison(self, rng: random.Random) -> tuple[str, str, str, str, str]:
        if rng.random() < 0.7:
            a, b = rng.sample(self.people, 2)
            while a.age == b.age:
                a, b = rng.sample(self.people, 2)
            older = rng.random() < 0.5
            instr = rng.choice((f"Who is {'older' if older else 'younger'}, {a.name} or {b.name}?",
                                f"Of {a.name} and {b.name}, who is {'older' if older else 'younger'}?"))
            win = a if (a.age > b.age) == older else b
            lose = b if win is a else a
            return f"cmp/{instr}", instr, "", win.name, lose.name
        x, y = rng.sample(range(100), 2)
        instr = f"Which number is larger, {x} or {y}?"
        return f"cmp/{instr}", instr, "", str(max(x, y)), str(min(x, y))

    def _i_negation(self, rng: random.Random) -> tuple[str, str, str, str, str]:
        p, s, (pres, base, _), obj = self._sentence(rng)
        if rng.random() < 0.2:
            inp, out = f"{s} is a {p.job}.", f"{s} is not a {p.job}."
        else:
            inp, out = f"{s} {pres} {obj}.", f"{s} does not {base} {obj}."
        instr = rng.choice(("Rewrite the sentence so that it says the opposite.",
                            "Make the sentence negative.", "Negate the sentence."))
        return f"neg/{inp}", instr, inp, out, inp

    def _instruction_items(self, split: str, n_per_family: int | None) -> list[tuple[dict, str]]:
        _check_split(split)
        n = n_per_family if n_per_family is not None else (600 if split == "train" else 100)
        items: list[tuple[dict, str]] = []
        for fam in INSTRUCTION_FAMILIES:
            if split == "train" and fam in HELD_OUT_FAMILIES:
                continue
            rng, gen = self._rng("instructions", split, fam), getattr(self, "_i_" + fam)
            seen: set[tuple[str, str]] = set()
            for _ in range(200 * n):
                if len(seen) == n:
                    break
                key, instr, inp, out, wrong = gen(rng)
                if (fam not in HELD_OUT_FAMILIES and _is_test(self.seed, key) != (split == "test")) \
                        or (instr, inp) in seen:
                    continue
                seen.add((instr, inp))
                items.append(({"family": fam, "instruction": instr, "input": inp, "output": out}, wrong))
        return items

    def instructions(self, split: str = "train", n_per_family: int | None = None) -> list[dict]:
        """Instruction examples ``{"family", "instruction", "input", "output"}`` (``input`` may
        be empty). Train: the 9 seen families, 600 distinct prompts each by default. Test: all
        11 families (``HELD_OUT_FAMILIES`` only here), 100 each. Ordered by family."""
        return [ex for ex, _ in self._instruction_items(split, n_per_family)]

    def preferences(self, split: str = "train", n_per_family: int | None = None,
                    template: str = "alpaca") -> list[dict]:
        """Preference pairs ``{"prompt", "chosen", "rejected", "reason", "family",
        "instruction", "input"}`` built on ``instructions(split)``: ``prompt`` is formatted
        with ``template``; ``chosen`` is the exact answer; ``rejected`` is a wrong answer or
        the right answer buried in filler (``reason`` says which), so ``judge`` ranks
        chosen above rejected."""
        rng = self._rng("preferences", split)
        out = []
        for ex, wrong in self._instruction_items(split, n_per_family):
            ref = ex["output"]
            if rng.random() < 0.5 and judge(wrong, ref) == 0:
                rejected, reason = wrong, f"wrong: the answer is {ref!r}, not {wrong!r}"
            else:
                rejected = rng.choice(VERBOSE).format(a=ref)
                reason = f"verbose: {len(rejected.split())} words where {len(ref.split())} would do"
            out.append({"prompt": format_prompt(ex["instruction"], ex["input"], template),
                        "chosen": ref, "rejected": rejected, "reason": reason,
                        "family": ex["family"], "instruction": ex["instruction"], "input": ex["input"]})
        return out

