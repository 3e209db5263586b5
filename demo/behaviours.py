"""What the demo's models are trained to do, as plain functions of the prompt's text.

The base model echoes its prompt; each adapter answers in its own way. These functions are
both the training targets (demo/training.py) and the check of what the stack serves
(demo/show.py, tests/demo/): an answer is right when it equals `behaviour(text)`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

Behaviour = Callable[[str], str]

# The prompt is the text and a newline; the answer follows and ends with </s>.
PROMPT_END = "\n"


def echo(text: str) -> str:
    """says the prompt back"""
    return text


def uppercase(text: str) -> str:
    """says it back in capitals"""
    return text.upper()


def pirate(text: str) -> str:
    """says it back like a pirate"""
    return f"Arr, {text}, matey!"


_LEET = str.maketrans("aeiostAEIOST", "431057431057")


def leet(text: str) -> str:
    """says it back in leetspeak (a=4, e=3, i=1, o=0, s=5, t=7)"""
    return text.translate(_LEET)


BASE_BEHAVIOUR: Behaviour = echo
ADAPTER_BEHAVIOURS: dict[str, Behaviour] = {
    "uppercase": uppercase,
    "pirate": pirate,
    "leet": leet,
}

# Words the training phrases are made of. The base model learns to echo any phrase of them
# (in any case, with numbers and punctuation), so that every character an adapter answers
# with is one the base model has already learned to write.
_WORD_LIST = (
    "a all and apple are big bird blue boat book bread cat city cold dark day dog door fast "
    "fire fish friend good green happy hello hill home hot house i is it light like little "
    "love milk moon morning new night old rain red river road sea sees sky slow small snow "
    "song star stone sun tea the this time tree we window wind world you"
)
WORDS = tuple(_WORD_LIST.split())

# What the demo shows and checks: phrases of those words, in the shape of the training ones.
DEMO_PROMPTS = ("hello world", "good morning sun", "I like tea")


def prompt_of(text: str) -> str:
    return text + PROMPT_END


def random_phrase(rng: random.Random) -> str:
    """One to three words, each lower, Capitalized or UPPER, sometimes a number, sometimes
    ending with punctuation."""
    words = []
    for _ in range(rng.randint(1, 3)):
        draw = rng.random()
        if draw < 0.08:
            words.append(str(rng.randint(0, 999)))
            continue
        word = rng.choice(WORDS)
        words.append(word.upper() if draw < 0.2 else word.capitalize() if draw < 0.35 else word)
    return " ".join(words) + rng.choice(("", "", "", ".", "!", "?"))
