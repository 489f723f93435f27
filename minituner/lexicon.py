"""The world's lexicon: every word and sentence template the synthetic world speaks with.

``minituner/world.py`` draws people and events from these lists and fills these templates;
nothing here is random. The lists are the whole vocabulary of the world: a model trained on
its corpus meets no other content word, so a few thousand documents cover it many times.

Changing any list or template changes the generated data (the base model in ``weights/`` was
trained on ``World(0).corpus()``; ``tests/test_world.py`` pins its hash): add new words in
new lists, never by editing these.

Contents, top-down: names and things; the days and times of a story; verb forms for the
rewriting tasks; the tasks' names (``CLASS_NAMES``, ``INSTRUCTION_FAMILIES``); the event
templates of a day and the verbose fillers of rejected answers; the helpers that say a
number, an article or a list in English.
"""
from __future__ import annotations

import random
from typing import Sequence

# ------------------------------------------------------------------------ names and things
FEMALE = ("Ada", "Bea", "Cora", "Dana", "Eva", "Fay", "Gwen", "Hana", "Ida", "June", "Kira",
          "Lena", "Mia", "Nora", "Olga", "Pia", "Rosa", "Sara", "Tess", "Uma", "Vera", "Wren",
          "Yara", "Zoe", "Ella", "Iris", "Lucy", "Maya", "Nina", "Ruth")
MALE = ("Abel", "Ben", "Carl", "Dan", "Eli", "Finn", "Gus", "Hugo", "Ivan", "Jack", "Kai",
        "Leo", "Max", "Ned", "Omar", "Paul", "Rex", "Sam", "Tom", "Ugo", "Vic", "Walt", "Yuri",
        "Zack", "Adam", "Owen", "Noah", "Luke", "Ravi", "Theo")
TOWNS = ("Ashford", "Brookvale", "Cedarton", "Dunmore", "Elmwick", "Fernhill", "Glenrock",
         "Harwood", "Ivybridge", "Kingsley", "Larkspur", "Millbrook")
TERRAINS = ("by the sea", "by a river", "in the hills", "near a forest", "on a lake",
            "in a valley")
LANDMARKS = ("market", "bridge", "library", "tower", "bakery", "harbor", "mill", "park",
             "school", "museum")
COLORS = ("red", "blue", "green", "yellow", "white", "black", "purple", "orange", "brown",
          "grey")
PETS = ("dog", "cat", "rabbit", "parrot", "horse", "goat", "turtle", "hamster")
JOBS = ("baker", "teacher", "farmer", "doctor", "painter", "fisher", "nurse", "builder",
        "tailor", "driver", "singer", "cook", "gardener", "writer", "carpenter")
OBJECTS = (("cup", "cups"), ("book", "books"), ("hat", "hats"), ("box", "boxes"),
           ("chair", "chairs"), ("lamp", "lamps"), ("ball", "balls"), ("kite", "kites"),
           ("coat", "coats"), ("pen", "pens"), ("plate", "plates"), ("bag", "bags"),
           ("candle", "candles"), ("vase", "vases"))  # (singular, plural)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen",
                "sixteen", "seventeen", "eighteen", "nineteen", "twenty")

# -------------------------------------------------------------------------- time in a story
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
TIMES = ("In the morning", "Early in the day", "At noon", "After lunch", "In the afternoon",
         "Later", "Before dinner", "In the evening", "At night")

# (third person present, base, past, kind of object) for the rewriting families
VERBS = (("walks to", "walk to", "walked to", "place"), ("visits", "visit", "visited", "friend"),
         ("cleans", "clean", "cleaned", "thing"), ("paints", "paint", "painted", "thing"),
         ("finds", "find", "found", "thing"), ("sees", "see", "saw", "thing"),
         ("buys", "buy", "bought", "thing"), ("sells", "sell", "sold", "thing"),
         ("loses", "lose", "lost", "thing"), ("breaks", "break", "broke", "thing"),
         ("makes", "make", "made", "thing"), ("likes", "like", "liked", "color"),
         ("feeds", "feed", "fed", "pet"), ("reads", "read", "read", "text"),
         ("carries", "carry", "carried", "thing"), ("calls", "call", "called", "friend"))

# ------------------------------------------------------------------------------ the tasks
CLASS_NAMES = ("bad", "neutral", "good")  # label ids 0, 1, 2 of the day classification
# The instruction families, in generation order; the held-out ones appear only in the test
# split. (Not to be confused with model.FAMILIES, the architectures gpt2/llama/bert.)
INSTRUCTION_FAMILIES = ("arithmetic", "fact", "counting", "sorting", "reversing", "past_tense",
                        "yes_no", "extremum", "day_outcome", "comparison", "negation")
HELD_OUT_FAMILIES = ("comparison", "negation")

# -------------------------------------------------------------------- the events of a day
# An event is (value, template); templates use {s} subject, {his}, {him}, {friend}, {town},
# {place} (the landmark), {pet}, {thing} (a colored object), {things} (several), {n}.
GOOD = (
    "found {thing} on the road", "won a prize at the {place}", "got a kind letter from {friend}",
    "finished {his} work early", "was given {things} by {friend}",
    "had a long lunch with {friend}", "sold {things} at the {place}",
    "caught a big fish in the river", "got a new job offer", "found a coin in {his} coat",
)
NOT_GOOD = (
    "looked for {thing} all morning, but did not find it",
    "hoped to win a prize at the {place}, but did not",
    "waited for a letter from {friend}, but none came", "could not finish {his} work",
    "asked {friend} for {things}, but was not given any",
    "wanted to have lunch with {friend}, but {friend} never came",
    "tried to sell {things} at the {place}, but sold none",
    "went fishing in the river, but did not catch anything",
    "did not get the job {he} wanted",
)
BAD = (
    "lost {his} keys", "broke {thing}", "missed the bus to {town}", "got caught in the rain",
    "had a fight with {friend}", "fell off {his} bike", "burned the bread",
    "found that {his} {pet} was sick", "lost {things} at the {place}",
)
NOT_BAD = (
    "almost lost {his} keys, but found them in time",
    "nearly broke {thing}, but caught it before it fell",
    "ran and did not miss the bus to {town}", "expected rain, but the rain never came",
    "thought {friend} was angry, but they did not fight at all",
    "almost fell off {his} bike, but did not", "did not burn the bread this time",
    "feared that {his} {pet} was sick, but it was not",
)
ORDINARY = (
    "walked to the {place}", "fed {his} {pet}", "read a book", "saw {a_color} bird",
    "cleaned {his} house", "wrote a list of things to buy", "visited {friend} in {town}",
    "counted {his} {objs}", "took {his} {pet} for a walk", "sat in the park for a while",
)
# Negation flips a value: a good thing that did not happen is bad, a bad thing avoided good.
EVENTS = ((1, GOOD), (-1, NOT_GOOD), (-1, BAD), (1, NOT_BAD), (0, ORDINARY))
OUTCOME = {
    "good": ("All in all, it was a good day for {name}.", "It was a good day.",
             "{name} went to bed happy."),
    "bad": ("All in all, it was a bad day for {name}.", "It was a bad day.",
            "{name} went to bed sad."),
    "neutral": ("All in all, it was an ordinary day for {name}.", "The good and the bad "
                "evened out.", "It was neither a good nor a bad day."),
}

# The right answer {a} buried in filler: the "verbose" rejected side of a preference pair.
VERBOSE = ("Let me think about this carefully. The answer is {a}. I hope that this helps you!",
           "Sure! Here is my answer: {a}. Please tell me if you have any other questions.",
           "That is a good question. After thinking it over step by step, I would say {a}, "
           "and I am quite sure of it.",
           "Well, as far as I can tell from everything I know, it is {a}. That is my answer.")


# ---------------------------------------------------------------------- saying things
def cap(s: str) -> str:
    """Capitalize the first letter only: 'she lives' -> 'She lives' (str.capitalize would
    lower-case the rest)."""
    return s[:1].upper() + s[1:]


def number(rng: random.Random, n: int) -> str:
    """A number as a word or as digits (both appear, so a model links them)."""
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) and rng.random() < 0.5 else str(n)


def article(word: str) -> str:
    """'a red cup', 'an orange cup'."""
    return ("an " if word[:1] in "aeiou" else "a ") + word


def things(rng: random.Random, n: int, color: str, obj: int) -> str:
    """n objects of one color, ``obj`` an index into OBJECTS: 'three red cups' / 'a red cup'."""
    if n == 1:
        return f"{article(color) if rng.random() < 0.5 else 'one ' + color} {OBJECTS[obj][0]}"
    return f"{number(rng, n)} {color} {OBJECTS[obj][1]}"


def join_words(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
