"""Tests of the synthetic world: minituner/world.py (determinism, pinned seed-0 data, disjoint
splits, the documented rules), and the files it re-exports: lexicon.py, prompts.py (templates
by hand) and scoring.py (the evaluators on hand-written answers)."""
import collections
import hashlib
import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minituner import lexicon as L
from minituner.world import (CLASS_NAMES, HELD_OUT_FAMILIES, INSTRUCTION_FAMILIES, VERBS, World,
                             evaluate_classification, evaluate_instructions, exact_match, format_chat,
                             format_prompt, judge, normalize, win_rate)


@pytest.fixture(scope="module")
def w():
    return World(0)


@pytest.fixture(scope="module")
def corpus(w):
    return w.corpus("train")


@pytest.fixture(scope="module")
def cls(w):
    return w.classification("train"), w.classification("test")


@pytest.fixture(scope="module")
def ins(w):
    return w.instructions("train"), w.instructions("test")


def prompts(examples):
    return {(e["instruction"], e["input"]) for e in examples}


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_data_other_seed_other_data():
    a, b, c = World(3), World(3), World(4)
    for f in (lambda x: x.corpus("train", n_docs=50), lambda x: x.corpus("val", n_docs=20),
              lambda x: x.classification("test", n=30), lambda x: x.instructions("train", 10),
              lambda x: x.preferences("test", 5)):
        assert f(a) == f(b)
        assert f(a) != f(c)
    assert a.people == b.people and a.people != c.people


def test_generation_does_not_touch_global_random_state():
    import random
    random.seed(123)
    before = random.random()
    random.seed(123)
    World(1).corpus("train", n_docs=20)
    assert random.random() == before


# sha256 of json.dumps(data, sort_keys=True) for World(0) at the default sizes. The base model
# in weights/ was trained on corpus("train") and is measured on corpus("val"); the chapters
# report numbers on the tasks. Python's random.Random(str) streams are stable across versions.
PINNED_SEED_0 = {
    "corpus/train": "9fe403212920c3529d516901ec494884b09ad4120ced260aec981e1568da2a50",
    "corpus/val": "a168c1ebc09538b7c29a0d421a9d32206345a7271fa173d72c7dc01160133979",
    "classification/train": "cd7c3b011994ac50508758aed8ef663c77ef525b23823f8a41d6c27432483aac",
    "classification/test": "9db73e7cf33b1e7688162e8bc886cb20769b50ecef60af65cc7102e1981b254e",
    "instructions/train": "f7c3f16a032214b27f38df42e51a0b6ec3688b87b13ab0ee9983d09b2b938fb8",
    "instructions/test": "37da66e48ab806dd44287bb19caf99107c510620cf424b3bf790e4df3ecf7453",
    "preferences/train": "3b1acc097ac85aabdd64768dcbd709abc3100ebb0247d0fa615b3cb171e5bece",
    "preferences/test": "55bd20c5ea9f8ef90c25e1a88f7035f05ebd62be417b5ab2fcb72bad9c181cf1",
}


def test_seed_0_data_is_pinned(w, corpus, cls, ins):
    """World(0) generates exactly the data the base model and the chapters' numbers were made
    from. If this fails, generated content changed: restore it (add new content under new
    names and new random streams instead of editing a list, template or draw)."""
    data = {"corpus/train": corpus, "corpus/val": w.corpus("val"),
            "classification/train": cls[0], "classification/test": cls[1],
            "instructions/train": ins[0], "instructions/test": ins[1],
            "preferences/train": w.preferences("train"), "preferences/test": w.preferences("test")}
    got = {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest() for k, v in data.items()}
    assert got == PINNED_SEED_0


# --------------------------------------------------------------------------------- sizes
def test_sizes(w, corpus, cls, ins):
    chars = sum(map(len, corpus))
    assert len(corpus) == 30_000 and chars >= 8_000_000  # ~4 chars a token: >= 2 M tokens
    assert len(w.corpus("val")) == 1_000
    assert len(cls[0]) >= 5_000 and len(cls[1]) >= 1_000
    fam_train = collections.Counter(e["family"] for e in ins[0])
    fam_test = collections.Counter(e["family"] for e in ins[1])
    assert len(INSTRUCTION_FAMILIES) == 11 and set(HELD_OUT_FAMILIES) < set(INSTRUCTION_FAMILIES)
    assert set(fam_test) == set(INSTRUCTION_FAMILIES) and min(fam_test.values()) == 100
    assert set(fam_train) == set(INSTRUCTION_FAMILIES) - set(HELD_OUT_FAMILIES)
    assert min(fam_train.values()) == 600


def test_vocabulary_is_modest(w):
    words = {t for d in w.corpus("train", n_docs=5000) for t in re.findall(r"[A-Za-z]+", d)}
    assert 200 <= len(words) <= 2000


# -------------------------------------------------------------------------------- splits
def test_no_test_prompt_in_any_training_split(w, corpus, cls, ins):
    """Instruction, preference and story texts of the test split never occur in training."""
    train_texts = {e["text"] for e in cls[0]}
    assert not train_texts & {e["text"] for e in cls[1]}
    assert not prompts(ins[0]) & prompts(ins[1])
    pref_train = {p["prompt"] for p in w.preferences("train")}
    pref_test = {p["prompt"] for p in w.preferences("test")}
    assert not pref_train & pref_test
    # a story is in the same split in every task: test stories never train anything
    day_train = {e["input"] for e in ins[0] if e["family"] == "day_outcome"}
    day_test = {e["input"] for e in ins[1] if e["family"] == "day_outcome"}
    assert not day_train & {e["text"] for e in cls[1]}
    assert not day_test & train_texts
    # a test fact question is not asked in training in any phrasing (split by the fact)
    train_questions = {e["instruction"] + e["input"] for e in ins[0] if e["family"] == "fact"}
    test_questions = {e["instruction"] + e["input"] for e in ins[1] if e["family"] == "fact"}
    assert train_questions and test_questions and not train_questions & test_questions
    assert not set(w.corpus("val")) & set(corpus)


def test_held_out_families_only_in_test(ins):
    assert not {e["family"] for e in ins[0]} & set(HELD_OUT_FAMILIES)
    assert {e["family"] for e in ins[1]} >= set(HELD_OUT_FAMILIES)


def test_bad_arguments_name_the_fix(w):
    with pytest.raises(ValueError, match="split"):
        w.instructions("dev")
    with pytest.raises(ValueError, match="corpus split"):
        w.corpus("test")
    with pytest.raises(ValueError, match="n_people"):
        World(0, n_people=1)
    with pytest.raises(ValueError, match="template"):
        format_prompt("x", template="vicuna")


# ------------------------------------------------------------------------ the world's rules
def test_corpus_states_true_facts_only(w):
    """Every 'X lives in T', 'X is N years old', 'X's pet is a P' in the corpus is true, and
    every person's town is stated somewhere."""
    text = "\n".join(w.corpus("train", n_docs=3000))
    seen = set()
    for name, town in re.findall(r"\b([A-Z][a-z]+) lives in (?:the town of )?([A-Z][a-z]+)", text):
        if name in w.person:
            assert w.person[name].town == town
            seen.add(name)
    ages = re.findall(r"\b([A-Z][a-z]+) is (\d+) years old", text)
    pets = re.findall(r"\b([A-Z][a-z]+)'s pet is a (\w+)", text)
    assert len(ages) > 100 and len(pets) > 30
    for name, age in ages:
        assert name not in w.person or w.person[name].age == int(age)
    for name, pet in pets:
        assert w.person[name].pet == pet
    assert seen == set(w.person)


def _event_value(event: str) -> int:
    """Reference reader of one event: the documented value of the template it matches."""
    slot = {"his": "(?:her|his)", "he": "(?:she|he)", "him": "(?:her|him)", "friend": "[A-Z][a-z]+",
            "town": "[A-Z][a-z]+", "place": "[a-z]+", "pet": "[a-z]+", "thing": "an? [a-z]+ [a-z]+",
            "things": r"\w+ [a-z]+ [a-z]+", "objs": "[a-z]+", "a_color": "an? [a-z]+"}
    hits = [value for value, group in L.EVENTS for t in group
            if re.fullmatch(re.sub(r"\{(\w+)\}", lambda m: slot[m.group(1)], t), event)]
    assert len(hits) == 1, (event, hits)
    return hits[0]


def _label_of(text: str) -> int:
    total = 0
    for sent in text.rstrip(".").split(". ")[1:]:  # sentence 0 introduces the day
        for t in L.TIMES:
            sent = sent[len(t) + 2:] if sent.startswith(t + ", ") else sent
            sent = sent[: -len(t) - 1] if sent.endswith(" " + t.lower()) else sent
        sent = sent.split(" ", 1)[1]  # drop the subject (a name or a pronoun)
        total += sum(_event_value(e) for e in re.split(r", and then (?:she|he) ", sent))
    return (total > 0) - (total < 0) + 1


def test_story_labels_follow_the_documented_rule(cls):
    """Parsing each story's events back (with the templates and their documented values) and
    taking the sign of the sum gives the label, for train and test."""
    for ex in cls[0][:1500] + cls[1][:500]:
        assert _label_of(ex["text"]) == ex["label"], ex


def test_classes_are_balanced_and_no_word_decides_the_label(cls):
    """Majority label given 'the text contains word x' is right for at most 70% of the texts
    containing x, for every word (the best single word in this world reaches about 56%)."""
    train = cls[0]
    counts = collections.Counter(e["label"] for e in train)
    assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == 3
    by_word = collections.defaultdict(collections.Counter)
    for e in train:
        for t in set(re.findall(r"[a-z]+", e["text"].lower())):
            by_word[t][e["label"]] += 1
    frequent = {t: c for t, c in by_word.items() if sum(c.values()) >= 30}
    assert len(frequent) > 100
    best = max(max(c.values()) / sum(c.values()) for c in frequent.values())
    assert best < 0.7


def _reference_answer(w: World, e: dict) -> str:
    """A reference solver, written from the family descriptions: read the question back
    and answer it from the inputs and the world's people. Raises when it cannot read one."""
    f, q, x = e["family"], e["instruction"], e["input"]
    text = (q + " " + x).strip()
    nums = [int(n) for n in re.findall(r"\d+", text)]
    one = lambda pattern: re.search(pattern, text).groups()  # noqa: E731
    if f == "arithmetic":
        a, b = nums
        if "plus" in text or "+" in x or "Add" in q:
            return str(a + b)
        return str(a * b) if ("times" in text or "*" in x or "Multiply" in q) else str(a - b)
    if f == "fact":
        tests = [(r"(?:Where does|In which town does) (\w+) live|What is (\w+)'s home town", "town"),
                 (r"How old is (\w+)|What is (\w+)'s age", "age"),
                 (r"What is (\w+)'s favourite color|Which color does (\w+) like", "color"),
                 (r"What pet does (\w+)|What kind of animal is (\w+)'s pet", "pet"),
                 (r"What is (\w+)'s job|What does (\w+) do for a living", "job"),
                 (r"Who is (\w+)'s best friend|Who is the best friend of (\w+)", "friend")]
        for pattern, attr in tests:
            if m := re.search(pattern, text):
                return str(getattr(w.person[next(g for g in m.groups() if g)], attr))
        if m := re.search(r"How many (\w+) does (\w+) (?:have|own)", text):
            obj, person = m.groups()
            return str(next(n for o, _, n in w.person[person].objects if L.OBJECTS[o][1] == obj))
        person, obj = one(r"What color (?:are|is) (\w+)'s (\w+)\?")
        return next(c for o, c, _ in w.person[person].objects if obj in L.OBJECTS[o])
    if f == "counting":
        if m := re.search(r'the word "(\w+)" appear|how often (\w+) appears', text):
            return str(x.split(", ").count(next(g for g in m.groups() if g)))
        return str(len(x.split(", ")) if "items" in q else len(x.split()))
    if f == "sorting":
        items = x.split(", ")
        key = int if items[0].isdigit() else None
        return ", ".join(sorted(items, key=key, reverse="largest to" in q or "decreasing" in q))
    if f == "reversing":
        sep = ", " if "," in x else " "
        return sep.join(x.split(sep)[::-1])
    if f in ("past_tense", "negation"):
        name, rest = x.split(" ", 1)
        if rest.startswith("is a "):
            return f"{name} {'was' if f == 'past_tense' else 'is not'} {rest[3:]}"
        (pres, base, past, _), = [v for v in VERBS if rest.startswith(v[0] + " ")]
        return f"{name} {past if f == 'past_tense' else 'does not ' + base}{rest[len(pres):]}"
    if f == "yes_no":
        yes = lambda truth: "yes" if truth else "no"  # noqa: E731
        if m := re.search(r"Is (\w+) (\w+)'s best friend", text):
            return yes(w.person[m[2]].friend == m[1])
        p = w.person[one(r"(?:Is|Does) (\w+)")[0]]
        if "older than" in text:
            return yes(p.age > nums[0])
        for pattern, attr in ((r"live in (\w+)", "town"), (r"have an? (\w+)", "pet"),
                              (r"favourite color (\w+)", "color"), (r"Is \w+ an? (\w+)\?", "job")):
            if m := re.search(pattern, text):
                return yes(getattr(p, attr) == m[1])
    if f == "extremum":
        return str((max if ("larg" in q or "big" in q) else min)(nums))
    if f == "day_outcome":
        return CLASS_NAMES[_label_of(x)]
    if f == "comparison":
        if "Which number" in q:
            return str(max(nums))
        a, b = [n for n in re.findall(r"[A-Z][a-z]+", q) if n in w.person]
        older = max((a, b), key=lambda n: w.person[n].age)
        return older if "older" in q else ({a, b} - {older}).pop()
    raise AssertionError(f"no reference for family {f!r}")


def test_instruction_outputs_are_right(w, ins):
    """Every instruction example of both splits, in every family, has the answer that the
    reference solver above computes independently from its question and the world."""
    checked = collections.Counter()
    for e in ins[0] + ins[1]:
        assert e["output"] == _reference_answer(w, e), e
        checked[e["family"]] += 1
    assert set(checked) == set(INSTRUCTION_FAMILIES)


def test_preferences_rank_chosen_above_rejected(w):
    for split in ("train", "test"):
        prefs = w.preferences(split, n_per_family=30)
        assert all(judge(p["chosen"], p["chosen"]) == 2 > judge(p["rejected"], p["chosen"]) for p in prefs)
        reasons = collections.Counter(p["reason"].split(":")[0] for p in prefs)
        assert reasons["wrong"] > 0.3 * len(prefs) and reasons["verbose"] > 0.3 * len(prefs)
        assert win_rate([p["chosen"] for p in prefs], prefs) == 1.0
        assert win_rate([p["rejected"] for p in prefs], prefs) == 0.5  # a tie with itself
    assert w.preferences("train", 2)[0]["prompt"].startswith("### Instruction:\n")
    assert w.preferences("train", 2, template="chat")[0]["prompt"].endswith("<|assistant|>\n")


# ---------------------------------------------------------------------- prompt templates
def test_prompt_templates_by_hand():
    assert format_prompt("Add.", "1 and 2") == "### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:\n"
    assert format_prompt("Add 1 and 2.") == "### Instruction:\nAdd 1 and 2.\n\n### Response:\n"
    assert format_prompt("Add.", "1 and 2", "chat", system="Be brief.") == (
        "<|system|>\nBe brief.<|eos|>\n<|user|>\nAdd.\n\n1 and 2<|eos|>\n<|assistant|>\n")
    assert format_prompt("Hi", template="chat", system=None) == "<|user|>\nHi<|eos|>\n<|assistant|>\n"
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert format_chat(msgs) == "<|user|>\nHi<|eos|>\n<|assistant|>\nHello<|eos|>\n"
    with pytest.raises(ValueError, match="role"):
        format_chat([{"role": "bot", "content": "x"}])


# ---------------------------------------------------------------------------- evaluators
def test_exact_match_by_hand():
    assert exact_match("Ashford.", "ashford") and exact_match("  ASHFORD \n", "Ashford")
    assert exact_match("2, 5,  9", "2, 5, 9") and exact_match("Ada walked.", "ada walked")
    assert not exact_match("Ashford is", "Ashford") and not exact_match("12", "1 2")
    assert not exact_match("", "yes")
    assert normalize(" The Cat.. ") == "the cat"


def test_evaluate_instructions_by_hand():
    """3 seen examples, 2 right (2/3); 1 held-out, wrong (0); overall 2/4 = 0.5."""
    ex = [{"family": "arithmetic", "output": "12"}, {"family": "arithmetic", "output": "7"},
          {"family": "fact", "output": "Ashford"}, {"family": "negation", "output": "Ada does not read."}]
    r = evaluate_instructions(["12.", "8", "ashford", "Ada reads."], ex)
    assert r["exact_match"] == 0.5 and r["n"] == 4
    assert r["by_family"] == {"arithmetic": 0.5, "fact": 1.0, "negation": 0.0}
    assert r["seen"] == pytest.approx(2 / 3) and r["held_out"] == 0.0
    with pytest.raises(ValueError, match="one prediction per example"):
        evaluate_instructions(["1"], ex)


def test_evaluate_classification_by_hand():
    """Gold bad, neutral, good, good; predictions right, wrong, right (by name), wrong -> 0.5."""
    ex = [{"label": 0}, {"label": 1}, {"label": 2}, {"label": 2}]
    r = evaluate_classification([0, 2, "Good.", "banana"], ex)
    assert r["accuracy"] == 0.5 and r["per_class"] == {"bad": 1.0, "neutral": 0.0, "good": 0.5}
    assert evaluate_classification(["bad", "neutral", "good", 2], ex)["accuracy"] == 1.0
    # a classifier's argmax, as a tensor of ids, is read the same way as a list of ints
    logits = torch.tensor([[2.0, 0, 0], [0, 0, 1], [0, 0, 3], [1, 0, 0]])  # (B, 3)
    assert evaluate_classification(logits.argmax(-1), ex)["accuracy"] == 0.5
    assert math.isnan(evaluate_classification([0], ex[:1])["per_class"]["good"])  # no gold 'good'
    with pytest.raises(ValueError, match="no examples"):
        evaluate_classification([], [])
    assert CLASS_NAMES == ("bad", "neutral", "good")


def test_judge_and_win_rate_by_hand():
    """judge: exact = 2, reference inside a longer answer = 1, otherwise 0. Win rate of
    [exact, verbose, wrong] against [wrong, verbose, exact] = (1 + 0.5 + 0) / 3 = 0.5."""
    assert judge("12", "12") == 2 and judge("The answer is 12.", "12") == 1
    assert judge("112", "12") == 0 and judge("13", "12") == 0 and judge("", "12") == 0
    assert judge("I would say no, sadly", "no") == 1 and judge("I know", "no") == 0
    ex = [{"chosen": "12"}, {"chosen": "red"}, {"output": "Ada"}]
    assert win_rate(["12", "It is red.", "Ben"], ex, against=["13", "I think red", "Ada"]) == 0.5
    assert win_rate(["12", "red", "Ada"], [dict(e, rejected="x") for e in ex]) == 1.0


@settings(max_examples=40)
@given(st.text(max_size=30), st.text(max_size=10))
def test_judge_invariants(answer, ref):
    """judge is 2 exactly when exact_match holds, and at least 1 only when the normalized
    reference is inside the normalized answer; the reference itself always scores 2 and
    filler around it (VERBOSE) scores 1."""
    s = judge(answer, ref)
    assert (s == 2) == exact_match(answer, ref) and s in (0, 1, 2)
    assert s == 0 or normalize(ref) in normalize(answer)
    assert judge(ref, ref) == 2
    if normalize(ref) and re.fullmatch(r"\w+", normalize(ref)):
        assert judge(L.VERBOSE[0].format(a=ref), ref) == 1
