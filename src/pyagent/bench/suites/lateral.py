"""Lateral reasoning: word puzzles that need a word seen as letters rather than meaning.

Items take words from the embedded `WORDS` and ask for a word reversed, an anagram unscrambled
(only words whose letters make no other word of the list, which holds partners like
"heart"/"earth" so both are left out), the k-th letter, a letter's count or the word spelled by
first letters. The word, letter (in any case) or number is graded exactly.
"""

from __future__ import annotations

import random
import string
from collections import Counter

from pyagent.bench.suites.answers import grade_int, grade_word
from pyagent.bench.suites.base import Grade, Problem, Turn

WORDS = (
    "act", "ant", "ape", "arm", "axe", "bag", "bat", "bed", "bee", "bow", "box", "boy", "bus",
    "car", "cat", "cow", "cup", "day", "dog", "ear", "egg", "elf", "emu", "eye", "fan", "fox",
    "gum", "hat", "hen", "hut", "ice", "ink", "jam", "jet", "key", "kid", "leg", "lip", "log",
    "map", "mud", "net", "nut", "oak", "oar", "owl", "pan", "pen", "pig", "pot", "rat", "red",
    "rug", "sad", "sea", "six", "sky", "sun", "ten", "toy", "tub", "van", "web", "wig", "yak",
    "zip", "zoo", "army", "baby", "ball", "bank", "bell", "bird", "blue", "boat", "book", "cake",
    "city", "corn", "desk", "drum", "duck", "echo", "edge", "exit", "farm", "fish", "foot", "fork",
    "frog", "game", "gate", "girl", "gold", "gray", "hair", "hand", "head", "hill", "home", "hope",
    "hour", "iron", "jump", "king", "kite", "lamp", "milk", "moon", "open", "oval", "oven", "palm",
    "park", "pink", "play", "quiz", "rain", "rice", "road", "rock", "roof", "sand", "seed", "sign",
    "sing", "soap", "sock", "sofa", "song", "soup", "swim", "talk", "tree", "ugly", "unit", "walk",
    "wall", "week", "wind", "word", "yard", "year", "zero", "zone", "actor", "adult", "alarm",
    "album", "ankle", "apple", "apron", "arrow", "beach", "beard", "black", "bread", "brown",
    "chair", "cheese", "child", "clock", "dance", "dress", "eagle", "earth", "empty", "enemy",
    "entry", "giant", "glass", "glove", "happy", "heart", "heavy", "honey", "horse", "house",
    "igloo", "index", "juice", "knife", "laugh", "lemon", "light", "magic", "melon", "money",
    "month", "mouse", "movie", "music", "night", "onion", "orbit", "otter", "paper", "pasta",
    "piano", "pizza", "puppy", "quick", "queen", "radio", "river", "salad", "scarf", "sheep",
    "shirt", "shore", "spoon", "stamp", "storm", "story", "sugar", "thing", "tiger", "today",
    "train", "truck", "uncle", "under", "usual", "video", "visit", "voice", "watch", "water",
    "whale", "wheel", "white", "write", "young", "zebra", "anchor", "animal", "answer", "autumn",
    "banana", "basket", "bottle", "bridge", "bucket", "butter", "button", "candle", "carrot",
    "cherry", "circle", "coffee", "doctor", "donkey", "dragon", "driver", "energy", "engine",
    "family", "father", "guitar", "island", "jacket", "jungle", "kettle", "kitten", "knight",
    "ladder", "letter", "minute", "mirror", "monkey", "mother", "napkin", "needle", "number",
    "office", "orange", "oxygen", "pencil", "people", "pepper", "pillow", "planet", "pocket",
    "potato", "prince", "purple", "puzzle", "rabbit", "rocket", "saddle", "school", "second",
    "bright", "spring", "square", "summer", "ticket", "tomato", "travel", "tunnel", "turtle",
    "umpire", "valley", "violin", "wallet", "window", "winter", "wizard", "yellow", "yogurt",
    "zipper", "airport", "balloon", "blanket", "brother", "cabbage", "captain", "cartoon",
    "chapter", "chicken", "country", "diamond", "dolphin", "evening", "feather", "freedom",
    "giraffe", "harvest", "holiday", "husband", "journey", "kitchen", "lantern", "library",
    "machine", "mermaid", "monster", "morning", "network", "octopus", "ostrich", "pancake",
    "panther", "peacock", "penguin", "picture", "popcorn", "pumpkin", "pyramid", "rainbow",
    "rooster", "shelter", "station", "student", "sweater", "tractor", "trumpet", "unicorn",
    "vampire", "village", "volcano", "weather", "whisper", "airplane", "backpack", "baseball",
    "bathroom", "birthday", "children", "computer", "cucumber", "dinosaur", "doorbell", "elephant",
    "envelope", "exercise", "festival", "football", "goldfish", "hedgehog", "homework", "hospital",
    "kangaroo", "keyboard", "language", "magazine", "marathon", "mountain", "mushroom", "necklace",
    "notebook", "painting", "princess", "question", "reindeer", "sandwich", "scissors", "shoulder",
    "skeleton", "squirrel", "strength", "sunlight", "sunshine", "swimming", "thousand", "tomorrow",
    "tortoise", "treasure", "umbrella", "uniform", "vacation", "xylophone")

SIGNATURES = Counter("".join(sorted(w)) for w in WORDS)
STARTS = {letter: tuple(w for w in WORDS if w[0] == letter) for letter in set("".join(WORDS))}
KINDS = ("reverse", "anagram", "letter", "count", "initials")


def ordinal(n: int) -> str:
    """'1st', '2nd', '3rd', '4th', ..."""
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def words_of(low: int, high: int) -> tuple[str, ...]:
    return tuple(w for w in WORDS if low <= len(w) <= high)


def puzzle(rng: random.Random, kind: str, length: int) -> tuple[str, str]:
    """A question of `kind` on words of `length` or `length` + 1 letters, and its answer."""
    band = words_of(length, length + 1)
    if kind == "reverse":
        word = rng.choice([w for w in band if w != w[::-1]])
        return f"Write the word '{word}' backwards.", word[::-1]
    if kind == "anagram":
        word = rng.choice([w for w in words_of(max(length, 4), length + 1)
                           if SIGNATURES["".join(sorted(w))] == 1 and len(set(w)) > 1])
        letters = list(word)
        while "".join(letters) == word:
            rng.shuffle(letters)
        return (f"Unscramble the letters '{''.join(letters)}' to make a common English word.",
                word)
    if kind == "letter":
        word = rng.choice(band)
        index = rng.randrange(len(word))
        return f"What is the {ordinal(index + 1)} letter of the word '{word}'?", word[index]
    if kind == "count":
        word = rng.choice(band)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(
            [c for c in string.ascii_lowercase if c not in word])
        return (f"How many times does the letter '{letter}' appear in the word '{word}'?",
                str(word.count(letter)))
    word = rng.choice([w for w in band if all(len(STARTS[c]) > 1 for c in w)])
    clues = [rng.choice([w for w in STARTS[c] if w != word]) for c in word]
    return (f"Take the first letter of each of these words: {', '.join(clues)}. "
            "What word do they spell?", word)


class Lateral:
    """Puzzles on words of `difficulty` or `difficulty` + 1 letters (anagrams: at least 4);
    the spelled word of a first-letters puzzle has that many letters."""

    name = "lateral"
    measures = "Treating a word as a string of letters: reversing, unscrambling, indexing."
    instruction = ("Solve the word puzzle. Answer on one line with the answer only: a word or a "
                   "letter in lowercase, or a number in digits.")
    difficulties = (3, 5, 7)
    max_tokens = 16

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        kind = rng.choice(KINDS)
        question, answer = puzzle(rng, kind, difficulty)
        return Problem((Turn(question, answer),), {"kind": kind}, tags=(kind,))

    def grade(self, problem: Problem, turn: int, answer: str) -> Grade:
        expected = problem.turns[turn].answer
        if problem.data["kind"] == "count":
            return grade_int(answer, int(expected))
        return grade_word(answer, expected)


FAMILY = Lateral()
