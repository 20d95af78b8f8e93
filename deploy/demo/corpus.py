"""General text in the demo's language, generated from a seed: what the built-in model reads
before any federation starts (``flora.demo.pretrain``).

Sentences about the demo's words, countries and opposites, lists, numbers, and words in capital
letters: the facts and the forms the demo's tasks rely on, stated as plain prose. Many repeat
what came before them (a country named twice, words said again or written in capitals), so that
the model learns to copy from its context, as real language models do and the tasks need. Never
the tasks themselves: no instructions, no questions and answers, no prompt template.
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
        f"{country}: {city}.",
        f"{city} is the capital of {country}.",
        f"{rng.choice(_NAMES)} flew to {country}. The capital of {country} is {city}.",
        f"In {country}, the government sits in {city}.",
    ))


def _opposite_fact(rng: random.Random) -> str:
    word = rng.choice(sorted(OPPOSITES))
    other = OPPOSITES[word]
    a, b = (word, other) if rng.random() < 0.5 else (other, word)
    return rng.choice((
        f"The opposite of {a} is {b}.",
        f"It was not {a}. The opposite of {a} is {b}.",
        f"{a.capitalize()} and {b} are opposites.",
        f"Some days are {a} and some are {b}.",
    ))


def _story(rng: random.Random) -> str:
    name, verb, place = rng.choice(_NAMES), rng.choice(_VERBS), rng.choice(_PLACES)
    first, second = rng.sample(WORDS, 2)
    return f"{name} {verb} a {first} {second} {place}."


def _shout(rng: random.Random) -> str:
    """Words, then the same words in capital letters: the model learns to copy them up."""
    words = " ".join(rng.sample(WORDS, rng.randint(1, 4)))
    return rng.choice((
        f"The sign said {words}, in big letters: {words.upper()}.",
        f"{rng.choice(_NAMES)} read {words} and shouted {words.upper()}!",
        f"Small: {words}. Big: {words.upper()}.",
    ))


def _echo(rng: random.Random) -> str:
    """Words said twice: what lets the model copy from earlier in its context."""
    words = " ".join(rng.sample(WORDS, rng.randint(1, 5)))
    first, second = rng.sample(_NAMES, 2)
    return rng.choice((
        f"{first} said {words}, and {second} said {words} too.",
        f"The words were {words}. Again: {words}.",
        f"{first} wrote a list: {words.replace(' ', ', ')}.",
    ))


def _numbers(rng: random.Random) -> str:
    """Counting up, down and in twos: the sequences the demo's counting tasks continue."""
    start, length = rng.randint(0, 99), rng.randint(3, 8)
    up = " ".join(str(n) for n in range(start, min(start + length, 100)))
    down = " ".join(str(n) for n in range(start, max(start - length, -1), -1))
    twos = " ".join(str(n) for n in range(start, min(start + 2 * length, 100), 2))
    count, word = rng.randint(2, 12), rng.choice(WORDS)
    return rng.choice((
        f"They counted {up}.",
        f"They counted down {down}.",
        f"They counted in twos {twos}.",
        f"There were {count} {word} stones in the box.",
        f"{rng.choice(_NAMES)} was {rng.randint(5, 80)} years old in {rng.randint(1900, 2030)}.",
    ))


_SENTENCES: tuple[Callable[[random.Random], str], ...] = (
    _capital_fact, _capital_fact, _capital_fact, _opposite_fact, _opposite_fact, _opposite_fact,
    _shout, _echo, _story, _numbers, _numbers, _numbers,
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
