"""The synthetic task's vocabulary: the colours, shapes and actions ``vmr synth`` draws, and the
word list the local tokenizer (vmr/text.py) is built from. A module of its own so that the model's
tokenizer never reaches the data layer (synth renders videos with torchcodec)."""

from __future__ import annotations

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
}
SHAPES = ("circle", "square", "triangle")
ACTIONS = ("moves left", "moves right", "moves up", "moves down", "grows", "shrinks", "blinks")


def synthetic_vocabulary() -> list[str]:
    """Every word of a synthetic query, unique, in a fixed order (the tokenizer's ids depend on it)."""
    words = ["a", "an", "the", "person", "object", *COLOURS, *SHAPES]
    for action in ACTIONS:
        words += action.split()
    return list(dict.fromkeys(words))
