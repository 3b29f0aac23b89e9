"""Passkey retrieval prompts sized in the model's own tokens.

The classic test (Mohtashami & Jaggi, 2023; RULER's ``passkey``): a number
hidden at a chosen depth in repeated filler, asked for at the end.  The
prompt is plain text for a completion endpoint, ending in the answer prefix
"The pass key is"; its length counts the tokens the engine will see
(special tokens included).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
         "Find it and memorize them. I will quiz you about the important information there.\n\n")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. "
          "Here we go. There and back again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    prompt: str          # plain text for a completion endpoint
    answer: str
    depth: float         # needle position as a fraction of the filler
    num_tokens: int      # prompt length in the model's tokens


def _text(n_words: int, depth: float, key: str) -> str:
    """``n_words`` words of filler with the needle after ``depth`` of them."""
    words = (FILLER * (n_words // 5 + 1)).split()[:n_words]
    before = round(n_words * depth)
    return (INTRO + " ".join(words[:before] + [NEEDLE.format(key=key).strip()] + words[before:])
            + QUESTION)


def passkey_sample(tokenizer, target_tokens: int, depth: float = 0.5,
                   seed: int = 0) -> PasskeySample:
    """The longest prompt of at most ``target_tokens`` tokens.

    ``tokenizer`` is the model's HF tokenizer.  Deterministic in ``seed`` (the
    key) and ``depth`` (0 = start of the filler, 1 = end).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    key = str(random.Random(seed).randint(10000, 99999))

    def length(n: int) -> int:
        return len(tokenizer(_text(n, depth, key), verbose=False)["input_ids"])

    if length(0) > target_tokens:
        raise ValueError(f"target_tokens={target_tokens} is too small for a passkey prompt "
                         f"(needs at least {length(0)})")
    lo, hi = 0, 1
    while length(hi) <= target_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # binary search on the number of filler words
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if length(mid) <= target_tokens else (lo, mid)
    return PasskeySample(prompt=_text(lo, depth, key), answer=key, depth=depth,
                         num_tokens=length(lo))
