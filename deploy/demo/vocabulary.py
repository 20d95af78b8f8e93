"""The demo's little world: the words, countries and opposites its pre-training prose is made of.

The corpus (``flora.demo.corpus``) states them as general knowledge, as a real base model has
read about the world; the instruction tasks (``flora.demo.sample_data``) ask about counting, which
the corpus holds too, so that what the built-in model is asked is never all it has read.
"""

from __future__ import annotations

WORDS = (
    "red green blue river stone light cloud apple tiger paper music garden winter summer "
    "silver window forest yellow orange purple rabbit bridge castle dragon"
).split()

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens", "Cuba": "Havana",
    "India": "New Delhi", "China": "Beijing", "Russia": "Moscow", "Brazil": "Brasilia", "Ireland": "Dublin",
    "Austria": "Vienna", "Portugal": "Lisbon", "Hungary": "Budapest", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Turkey": "Ankara",
    "Iran": "Tehran", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Nepal": "Kathmandu",
}

OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "day": "night", "old": "young",
    "open": "closed", "happy": "sad", "light": "dark", "early": "late", "full": "empty",
    "high": "low", "wet": "dry", "near": "far", "hard": "soft", "long": "short", "rich": "poor",
    "strong": "weak", "loud": "quiet", "thick": "thin", "left": "right", "win": "lose",
    "first": "last", "clean": "dirty", "deep": "shallow", "inside": "outside",
    "push": "pull", "buy": "sell", "north": "south",
}
