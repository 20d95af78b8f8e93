"""General text in the demo's language, generated from a seed: what the built-in model reads
before any federation starts (``flora.demo.pretrain``).

Sentences about the demo's words, countries and opposites, lists, numbers, and words in capital
letters: the facts and the forms the demo's tasks rely on, stated as plain prose. Never the
tasks themselves: no instructions, no questions and answers, no prompt template.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from flora.demo.vocabulary import CAPITALS, OPPOSITES, WORDS

_NAMES = "Ada Ben Cleo Dan Eva Finn Gus Hana Ivo Jade Kai Lea Max Nora Omar Pia".split()
_VERBS = "saw painted found drew liked carried counted kept".split()
_PLACES = "near the bridge|by the river|in the garden|under the cloud|at the castle|in the forest".split("|")


def _capital_fact(rng: random.Random) -> str:
    country = rng.choice(sorted(CAPITALS))
    city = CAPITALS[country]
    return rng.choice((
        f"The capital of {country} is {city}.",
        f"{city} is the capital of {country}.",
        f"{rng.choice(_NAMES)} flew to {city}, the capital of {country}.",
        f"In {country}, the government sits in {city}.",
        f"The largest news of {country} comes from its capital, {city}.",
    ))


def _opposite_fact(rng: random.Random) -> str:
    word = rng.choice(sorted(OPPOSITES))
    other = OPPOSITES[word]
    a, b = (word, other) if rng.random() < 0.5 else (other, word)
    return rng.choice((
        f"The opposite of {a} is {b}.",
        f"{a.capitalize()} and {b} are opposites.",
        f"It was not {a}, it was {b}.",
        f"Some days are {a} and some are {b}.",
    ))


def _story(rng: random.Random) -> str:
    name, verb, place = rng.choice(_NAMES), rng.choice(_VERBS), rng.choice(_PLACES)
    first, second = rng.sample(WORDS, 2)
    return f"{name} {verb} a {first} {second} {place}."


def _shout(rng: random.Random) -> str:
    words = " ".join(rng.sample(WORDS, rng.randint(1, 4)))
    return rng.choice((
        f"The sign said {words.upper()} in big letters.",
        f"{rng.choice(_NAMES)} shouted {words.upper()}!",
        f"{words.upper()}. That was the title of the {rng.choice(WORDS)} book.",
        f"On the wall: {words.upper()} and below it, {words}.",
    ))


def _word_list(rng: random.Random) -> str:
    words = rng.sample(WORDS, rng.randint(2, 6))
    return rng.choice((
        f"{rng.choice(_NAMES)} wrote a list: {', '.join(words)}.",
        f"The words were {' '.join(words)}.",
        f"First {words[0]}, then {words[-1]}.",
        f"{' '.join(words).capitalize()}.",
    ))


def _numbers(rng: random.Random) -> str:
    start = rng.randint(0, 90)
    run = " ".join(str(n) for n in range(start, start + rng.randint(3, 8)))
    count, word = rng.randint(2, 12), rng.choice(WORDS)
    return rng.choice((
        f"They counted {run}.",
        f"There were {count} {word} stones in the box.",
        f"{rng.choice(_NAMES)} was {rng.randint(5, 80)} years old in {rng.randint(1900, 2030)}.",
        f"Page {rng.randint(1, 300)} of {rng.randint(300, 900)}.",
    ))


_SENTENCES: tuple[Callable[[random.Random], str], ...] = (
    _capital_fact, _capital_fact, _capital_fact, _opposite_fact, _opposite_fact, _opposite_fact,
    _story, _shout, _word_list, _numbers,
)


def paragraph(rng: random.Random) -> str:
    """A few sentences of any kind, some on one line and some on the next."""
    sentences = [rng.choice(_SENTENCES)(rng) for _ in range(rng.randint(2, 6))]
    return "".join(s + rng.choice((" ", " ", "\n")) for s in sentences).strip()


def paragraphs(seed: int) -> Iterator[str]:
    """An endless, seeded stream of paragraphs: the same seed always gives the same text."""
    rng = random.Random(f"flora-corpus-{seed}")
    while True:
        yield paragraph(rng)
