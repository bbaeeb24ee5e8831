"""The seven reasoning families: seeded generation, graders on hand-checked answers, generators
checked against independent solvers, and the reasoning suite's splits and items."""

import random
import re
from collections import Counter
from itertools import pairwise

import pytest

from pyagent.bench.suites import (
    abstract,
    adaptive,
    convergent,
    critical,
    divergent,
    lateral,
    systems,
)
from pyagent.bench.suites.answers import parse_int
from pyagent.bench.suites.base import Family, Problem, Turn
from pyagent.bench.suites.reasoning import reasoning_suite

SUITE = reasoning_suite()
FAMILIES = [SUITE.family(name) for name in SUITE.families]
CASES = [pytest.param(f, d, id=f"{f.name}-d{d}") for f in FAMILIES for d in f.difficulties]
BY_NAME = pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)


def problems(family: Family, difficulty: int, count: int, start: int = 0) -> list[Problem]:
    return [family.generate(random.Random(seed), difficulty)
            for seed in range(start, start + count)]


def one(question: str, answer: str, **data) -> Problem:
    return Problem((Turn(question, answer),), data)


def scores(family: Family, problem: Problem, answers: list[str]) -> list[float]:
    return [family.grade(problem, 0, a).score for a in answers]


# --- every family -------------------------------------------------------------------------------

def test_the_suite_holds_the_seven_families_in_order():
    assert SUITE.name == "reasoning"
    assert SUITE.families == ("convergent", "divergent", "lateral", "systems", "critical",
                              "abstract", "adaptive")


@BY_NAME
def test_a_family_states_what_it_measures_and_three_difficulties(family):
    assert isinstance(family, Family)
    module = {m.FAMILY.name: m for m in (convergent, divergent, lateral, systems, critical,
                                         abstract, adaptive)}[family.name]
    assert module.__doc__ and family.measures and family.instruction
    assert len(family.difficulties) == 3 and list(family.difficulties) == sorted(
        set(family.difficulties))
    assert 8 <= family.max_tokens <= 48


@pytest.mark.parametrize(("family", "difficulty"), CASES)
def test_items_are_deterministic_by_seed(family, difficulty):
    first = problems(family, difficulty, 20)
    assert problems(family, difficulty, 20) == first
    other = problems(family, difficulty, 20, start=1000)
    assert len({p.key() for p in first} & {p.key() for p in other}) < 5


@pytest.mark.parametrize(("family", "difficulty"), CASES)
def test_the_reference_answer_grades_correct(family, difficulty):
    for problem in problems(family, difficulty, 200):
        assert problem.key() and all("\n" not in t.question + t.answer for t in problem.turns)
        for turn, step in enumerate(problem.turns):
            if problem.choices is not None:
                assert step.answer in problem.choices
            for answer in (step.answer, f"A: {step.answer}.\nQ: next", f" {step.answer}\n"):
                grade = family.grade(problem, turn, answer)
                assert grade.correct and grade.score == 1.0, (step, answer, grade)


@pytest.mark.parametrize(("family", "difficulty"), CASES)
def test_empty_hedged_and_off_answers_are_wrong(family, difficulty):
    for problem in problems(family, difficulty, 40):
        for turn, step in enumerate(problem.turns):
            empty = family.grade(problem, turn, "  \n")
            assert (empty.score, empty.correct) == (0.0, False)
            assert empty.detail.startswith("malformed")
            hedged = family.grade(problem, turn, f"{step.answer} or {step.answer}x")
            assert not hedged.correct and hedged.score < 1
            assert not family.grade(problem, turn, "I do not know").correct


def test_items_of_the_three_splits_share_no_content():
    keys = {}
    for split in ("train", "validation", "test"):
        items = SUITE.items(split, 50)
        assert {i.split for i in items} == {split}
        keys[split] = {(i.family, "\x1f".join(t.question for t in i.turns)) for i in items}
        assert len(keys[split]) == len(items) == 50 * 21
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


def test_the_suite_yields_the_count_asked_with_unique_ids_and_worked_examples():
    items = SUITE.items("test", 30, seed=3)
    assert Counter((i.family, i.difficulty) for i in items) == {
        (f.name, d): 30 for f in FAMILIES for d in f.difficulties}
    assert len({i.id for i in items}) == len(items)
    for item in items:
        family = SUITE.family(item.family)
        assert item.instruction == family.instruction and item.max_tokens == family.max_tokens
        assert len(item.examples) == 2 and item.examples[0] != item.examples[1]
        assert item.scored and max(item.scored) < len(item.turns)
        assert SUITE.grade(item, item.scored[0], item.turns[item.scored[0]].answer).correct
    assert SUITE.items("test", 30, seed=3) == items
    assert SUITE.items("test", 30, seed=4)[0].turns != items[0].turns


# --- convergent ---------------------------------------------------------------------------------

def test_convergent_arithmetic_follows_precedence():
    assert convergent.evaluate([2, 3, 4], ["+", "*"]) == 14
    assert convergent.evaluate([10, 4, 8, 4, 11], ["-", "*", "*", "-"]) == -129
    assert convergent.evaluate([7, 2, 3], ["-", "-"]) == 2
    for problem in problems(convergent.FAMILY, 4, 100):
        if problem.data["kind"] == "arithmetic":
            text = problem.turns[0].question.removeprefix("Compute ").removesuffix(".")
            tokens = text.split()
            value = convergent.evaluate([int(t) for t in tokens[::2]], tokens[1::2])
            assert str(value) == problem.turns[0].answer


def test_convergent_grades_numbers_and_names():
    family = convergent.FAMILY
    sum_ = one("Compute 2 + 3 * 4.", "14", kind="arithmetic")
    assert scores(family, sum_, ["14", "14.", "Answer: 14", "+14", "20", "-14"]) == [
        1, 1, 1, 1, 0, 0]
    for bad in ("14 or 20", "x = 14", "2 + 12 = 14", "fourteen", ""):
        assert family.grade(sum_, 0, bad).detail.startswith("malformed"), bad
    who = one("Ana's boss is Ben. Ben's boss is Cal. Who is the boss of the boss of Ana?", "Cal",
              kind="lookup")
    assert scores(family, who, ["Cal", "cal.", "'Cal'", "Ben", "Ana"]) == [1, 1, 1, 0, 0]
    assert family.grade(who, 0, "Cal or Ben").detail.startswith("malformed")


@pytest.mark.parametrize("hops", convergent.FAMILY.difficulties)
def test_convergent_lookups_have_one_answer_hops_away(hops):
    for problem in problems(convergent.FAMILY, hops, 100):
        if problem.data["kind"] != "lookup":
            continue
        question = problem.turns[0].question
        facts = re.findall(r"(\w+)'s (\w+) is (\w+)\.", question)
        links = dict((a, b) for a, _, b in facts)
        assert len(links) == len(facts)  # nobody has two
        relation = facts[0][1]
        asked = re.search(r"Who is ((?:the \w+ of )+)(\w+)\?", question)
        assert asked[1].count(f"the {relation} of ") == hops
        person = asked[2]
        for _ in range(hops):
            person = links[person]
        assert person == problem.turns[0].answer


# --- divergent ----------------------------------------------------------------------------------

def test_divergent_counts_distinct_valid_answers_among_the_first_n():
    family = divergent.FAMILY
    pairs = one("pairs", "1,9; 2,8; 3,7", kind="pairs", n=3, high=20, total=10)
    assert scores(family, pairs, [
        "1,9; 2,8; 3,7", "(1, 9); (8, 2); (3,7)", "1,9; 9,1; 2,8", "1,9; 2,8; 0,10",
        "1,9; 2,8; 4,7", "1,9; 1,9; 2,8; 3,7", "5,5; 1,9; 2,8; 3,7", "1,9; 2 and 8; 3,7",
    ]) == pytest.approx([1, 1, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 1, 2 / 3])
    for bad in ("", "1 9", "I do not know", "one,nine; two,eight"):
        assert family.grade(pairs, 0, bad).detail.startswith("malformed"), bad
    multiples = one("multiples", "14, 21, 28", kind="multiples", n=3, k=7, low=10, high=40)
    assert scores(family, multiples, [
        "14, 21, 28", "35,28,21", "14, 14, 21", "7, 14, 21", "14, 21, 30", "14, 21, 28, 35",
        "7, 14, 21, 28", "14; 21; 28",
    ]) == pytest.approx([1, 1, 2 / 3, 2 / 3, 2 / 3, 1, 2 / 3, 0])
    grade = family.grade(multiples, 0, "14, 14, 21")
    assert (grade.correct, grade.parsed, grade.detail) == (
        False, "14, 14, 21", "2 of 3 valid and distinct")
    words = one("words", "apple, egg", kind="words", n=2, rule="vowel", value="",
                words=["apple", "egg", "tree", "owl"])
    assert scores(family, words, [
        "apple, egg", "Apple, EGG", "owl,apple", "apple, tree", "apple, ice", "apple, apple",
        "apple",
    ]) == [1, 1, 1, 0.5, 0.5, 0.5, 0.5]


@pytest.mark.parametrize("n", divergent.FAMILY.difficulties)
def test_divergent_references_have_n_answers_and_room_for_more(n):
    for problem in problems(divergent.FAMILY, n, 100):
        data = problem.data
        reference = problem.turns[0].answer.split(divergent.SEPARATORS[data["kind"]])
        assert len(reference) == n == data["n"]
        if data["kind"] == "pairs":
            assert divergent.pair_count(data["total"], data["high"]) > n
        elif data["kind"] == "multiples":
            assert sum(data["low"] < m < data["high"] for m in range(0, 500, data["k"])) > n
            assert data["low"] % data["k"] and data["high"] % data["k"]
        else:
            matching = [w for w in data["words"]
                        if divergent.has(w, data["rule"], data["value"])]
            assert len(matching) > n and len(data["words"]) > len(matching)


# --- lateral ------------------------------------------------------------------------------------

def test_lateral_grades_words_letters_and_counts():
    family = lateral.FAMILY
    reverse = one("Write the word 'garden' backwards.", "nedrag", kind="reverse")
    assert scores(family, reverse, ["nedrag", "NEDRAG", "'nedrag'.", "garden", "nedrg"]) == [
        1, 1, 1, 0, 0]
    for bad in ("n e d r a g", "n-e-d-r-a-g", "nedrag or garden", "42"):
        assert family.grade(reverse, 0, bad).detail.startswith("malformed"), bad
    count = one("How many times does the letter 'e' appear in the word 'elephant'?", "2",
                kind="count")
    assert scores(family, count, ["2", "two", "3", "1"]) == [1, 1, 0, 0]
    assert family.grade(count, 0, "2 times").detail.startswith("malformed")
    letter = one("What is the 3rd letter of the word 'planet'?", "a", kind="letter")
    assert scores(family, letter, ["a", "A", "'a'", "p", "an"]) == [1, 1, 1, 0, 0]


def test_lateral_word_list_is_clean_and_ordinals_read_well():
    assert len(lateral.WORDS) == len(set(lateral.WORDS)) >= 300
    assert all(w.isalpha() and w.islower() for w in lateral.WORDS)
    assert [lateral.ordinal(n) for n in (1, 2, 3, 4, 8, 11, 12, 13, 21)] == [
        "1st", "2nd", "3rd", "4th", "8th", "11th", "12th", "13th", "21st"]


@pytest.mark.parametrize("length", lateral.FAMILY.difficulties)
def test_lateral_answers_follow_from_the_question(length):
    for problem in problems(lateral.FAMILY, length, 300):
        question, answer = problem.turns[0].question, problem.turns[0].answer
        quoted = re.findall(r"'(\w+)'", question)
        kind = problem.data["kind"]
        if kind == "reverse":
            assert answer == quoted[0][::-1] and length <= len(answer) <= length + 1
        elif kind == "anagram":
            same = [w for w in lateral.WORDS if sorted(w) == sorted(quoted[0])]
            assert same == [answer] and quoted[0] != answer
        elif kind == "letter":
            index = int(re.search(r"the (\d+)\w\w letter", question)[1])
            assert answer == quoted[0][index - 1]
        elif kind == "count":
            assert answer == str(quoted[1].count(quoted[0]))
        else:
            clues = question.split(": ")[1].split(". ")[0].split(", ")
            assert answer == "".join(c[0] for c in clues) and answer in lateral.WORDS
            assert len(clues) in (length, length + 1)


# --- systems ------------------------------------------------------------------------------------

def run_program(question: str) -> tuple[str, int]:
    """The asked variable and its value, from a generated program read independently."""
    body, asked = re.fullmatch(r"Run this program: (.*)\. What is the value of (\w) at the end\?",
                               question).groups()
    values: dict[str, int] = {}
    for statement in body.split("; "):
        target, expression = statement.split(" = ")
        parts = [values.get(p, p) for p in expression.split()]
        value = int(parts[0])
        if len(parts) == 3:
            right = int(parts[2])
            value = {"+": value + right, "-": value - right, "*": value * right}[parts[1]]
        values[target] = value
    return asked, values[asked]


def tell_story(question: str) -> int:
    sentences = question.split(". ")
    count = int(re.search(r"has (\d+)", sentences[0])[1])
    for sentence in sentences[1:-1]:
        if match := re.search(r"(?:gets|finds|buys) (\d+) more", sentence):
            count += int(match[1])
        elif match := re.search(r"(?:gives away|loses) (\d+)", sentence):
            count -= int(match[1])
        elif "doubles" in sentence:
            count *= 2
        else:
            assert "half" in sentence and count % 2 == 0
            count //= 2
        assert 0 <= count <= 99
    return count


@pytest.mark.parametrize("steps", systems.FAMILY.difficulties)
def test_systems_answers_match_an_independent_run(steps):
    for problem in problems(systems.FAMILY, steps, 200):
        question, answer = problem.turns[0].question, int(problem.turns[0].answer)
        if problem.data["kind"] == "program":
            asked, value = run_program(question)
            assert (asked, value) == (problem.data["name"], answer)
            assert question.count(";") >= steps + 1
        else:
            assert tell_story(question) == answer
            assert question.count(".") == steps + 1


def test_systems_grades_numbers_and_the_asked_variable():
    family = systems.FAMILY
    program = one("Run this program: x = 3; y = x + 5. What is the value of y at the end?", "8",
                  kind="program", name="y")
    assert scores(family, program, ["8", "y = 8", "Y=8", "8.", "9", "y = 9"]) == [
        1, 1, 1, 1, 0, 0]
    for bad in ("x = 8", "8 apples", "y is 8", "eight or nine"):
        assert family.grade(program, 0, bad).detail.startswith("malformed"), bad
    story = one("Mia has 5 apples. Mia gets 3 more. How many apples does Mia have now?", "8",
                kind="story", name="")
    assert scores(family, story, ["8", "eight", "7"]) == [1, 1, 0]
    assert family.grade(story, 0, "x = 8").detail.startswith("malformed")


# --- critical -----------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", critical.FAMILY.difficulties)
def test_critical_has_at_most_one_wrong_step_which_propagates(steps):
    without = 0
    for problem in problems(critical.FAMILY, steps, 400):
        found = re.findall(r"Step (\d+): (\d+) ([-+*]) (\d+) = (\d+)\.",
                           problem.turns[0].question)
        assert [int(f[0]) for f in found] == list(range(1, steps + 1))
        wrong = []
        for index, (number, left, operator, right, result) in enumerate(found):
            a, b, shown = int(left), int(right), int(result)
            true = {"+": a + b, "-": a - b, "*": a * b}[operator]
            if shown != true:
                wrong.append(number)
                assert abs(shown - true) <= max(2, 24 // steps)
            if index + 1 < len(found):
                assert int(found[index + 1][1]) == shown  # the next step starts from it
        assert len(wrong) <= 1
        assert problem.turns[0].answer == (wrong[0] if wrong else "none")
        assert problem.choices == (*map(str, range(1, steps + 1)), "none")
        without += not wrong
    assert 0.15 < without / 400 < 0.35


def test_critical_grades_step_numbers_and_none():
    family = critical.FAMILY
    problem = Problem((Turn("Check ...", "3"),), {"steps": 3}, choices=("1", "2", "3", "none"))
    assert scores(family, problem, ["3", "Step 3", "step 3.", "2", "none", "None"]) == [
        1, 1, 1, 0, 0, 0]
    for bad in ("4", "0", "3 or 4", "steps 2 and 3", "no error", ""):
        assert family.grade(problem, 0, bad).detail.startswith("malformed"), bad
    clean = Problem((Turn("Check ...", "none"),), {"steps": 2}, choices=("1", "2", "none"))
    assert scores(family, clean, ["none", "NONE.", "1", "2"]) == [1, 1, 0, 0]


# --- abstract -----------------------------------------------------------------------------------

def test_abstract_grades_numbers_and_words():
    family = abstract.FAMILY
    sequence = one("What comes next? 3, 7, 11, 15, ?", "19", kind="number", rule="arithmetic")
    assert scores(family, sequence, ["19", "19.", "A: 19", "23", "15"]) == [1, 1, 1, 0, 0]
    for bad in ("19 or 23", "3, 7, 11, 15, 19", "n = 19"):
        assert family.grade(sequence, 0, bad).detail.startswith("malformed"), bad
    words = one("cat -> dbu, dog -> eph, sun -> tvo. What is pen -> ?", "qfo", kind="word",
                rule="shift+1")
    assert scores(family, words, ["qfo", "QFO", "pen", "qfp"]) == [1, 1, 0, 0]
    assert family.grade(words, 0, "qfo or pen").detail.startswith("malformed")


def test_abstract_letter_shift_wraps():
    assert abstract.shift("cat", 1) == "dbu"
    assert abstract.shift("xyz", 2) == "zab"
    assert abstract.shift("abc", -1) == "zab"


def differences(terms: list[int]) -> list[int]:
    return [b - a for a, b in pairwise(terms)]


def follows(rule: str, terms: list[int]) -> bool:
    """Whether a sequence, its answer last, follows the named rule."""
    if rule in ("arithmetic", "descending"):
        return len(set(differences(terms))) == 1
    if rule == "geometric":
        return len({b / a for a, b in pairwise(terms)}) == 1
    if rule == "second-order":
        return len(set(differences(differences(terms)))) == 1
    if rule == "interleaved":
        return all(len(set(differences(side))) == 1 for side in (terms[::2], terms[1::2]))
    return rule == "fibonacci" and all(c == a + b for (a, b), c in zip(
        pairwise(terms), terms[2:], strict=False))


def maps(rule: str, pairs: list[tuple[str, str]]) -> bool:
    """Whether input -> output pairs follow the named rule."""
    if rule.startswith("shift"):
        return all(abstract.shift(x, int(rule[5:])) == y for x, y in pairs)
    if rule == "reverse-digits":
        return all(x[::-1] == y for x, y in pairs)
    xs, ys = [int(x) for x, _ in pairs], [int(y) for _, y in pairs]
    if rule.startswith("square"):
        return len({y - x * x for x, y in zip(xs, ys, strict=True)}) == 1
    return len({(y - ys[0]) / (x - xs[0]) for x, y in zip(xs[1:], ys[1:], strict=True)}) == 1


@pytest.mark.parametrize("level", abstract.FAMILY.difficulties)
def test_abstract_examples_follow_one_rule(level):
    for problem in problems(abstract.FAMILY, level, 200):
        question, answer = problem.turns[0].question, problem.turns[0].answer
        rule = problem.data["rule"]
        if question.startswith("What comes next?"):
            terms = [int(t) for t in re.findall(r"\d+", question)]
            assert follows(rule, [*terms, int(answer)]), question
            assert len(terms) >= 4
        else:
            query = re.search(r"What is (\w+) ->", question)[1]
            pairs = [*re.findall(r"(\w+) -> (\w+)", question), (query, answer)]
            assert maps(rule, pairs), question
            assert len(pairs) == (5 if level == 1 else 4)


# --- adaptive -----------------------------------------------------------------------------------

def rule_of(text: str):
    """A rule from its description, 'odd -> A' or '> 50 -> B'."""
    condition, label = text.split(" -> ")
    other = "B" if label == "A" else "A"
    if condition == "odd":
        return lambda n: label if n % 2 else other
    cut = int(condition[2:])
    return lambda n: label if n > cut else other


@pytest.mark.parametrize("difficulty", adaptive.FAMILY.difficulties)
def test_adaptive_episodes_switch_rules_once_on_a_telling_turn(difficulty):
    for problem in problems(adaptive.FAMILY, difficulty, 100):
        assert len(problem.turns) == 12 and problem.scored == (7, 8, 9, 10, 11)
        assert problem.choices == ("A", "B")
        assert problem.turns[0].question.startswith("You will classify numbers as A or B.")
        before, after = rule_of(problem.data["before"]), rule_of(problem.data["after"])
        numbers = [int(re.search(r"Number: (\d+)\?$", t.question)[1]) for t in problem.turns]
        for index, (number, turn) in enumerate(zip(numbers, problem.turns, strict=True)):
            assert turn.answer == (before if index < 6 else after)(number)
        assert before(numbers[6]) != after(numbers[6])
        assert {before(n) for n in numbers[:6]} == {"A", "B"}
    assert problem.data["change"] == {1: "parity-swap", 2: "threshold-swap",
                                      3: "threshold-move"}[difficulty]


def test_adaptive_grades_each_turn_against_its_own_label():
    family = adaptive.FAMILY
    problem = Problem((Turn("Number: 3?", "A"), Turn("Number: 4?", "B")), choices=("A", "B"))
    assert [family.grade(problem, 0, a).score for a in ("A", "a", "A.", "B")] == [1, 1, 1, 0]
    assert [family.grade(problem, 1, a).score for a in ("B", "b", "A")] == [1, 1, 0]
    for bad in ("A or B", "C", "AB", "Label A", ""):
        assert family.grade(problem, 0, bad).detail.startswith("malformed"), bad


def test_parse_int_reads_plain_and_assigned_integers():
    assert [parse_int(t) for t in ("42", "-3", "+5", "1,200", "\u22127", "seven", "x = 5")] == [
        42, -3, 5, 1200, -7, 7, None]
    assert parse_int("x = 5", ("x",)) == 5
    assert parse_int("12,13") is None
