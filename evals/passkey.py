"""Passkey retrieval prompts sized in the model's own tokens.

The classic test (Mohtashami & Jaggi, 2023; RULER's ``passkey``): a number
hidden at a chosen depth in repeated filler, asked for at the end.  Length is
measured on the chat-templated prompt, so the target is what the model sees.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = ("The grass is green. The sky is blue. The sun is yellow. "
          "Here we go. There and back again. ")
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it.\n\n")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    prompt: str          # chat-templated text, ready for a completion endpoint
    messages: list       # the same as chat messages, for a chat endpoint
    answer: str
    depth: float         # needle position as a fraction of the filler
    num_tokens: int      # templated prompt length in the model's tokens


def _messages(n_filler: int, depth: float, key: str) -> list[dict[str, str]]:
    before = round(n_filler * depth)
    body = FILLER * before + NEEDLE.format(key=key) + FILLER * (n_filler - before)
    return [{"role": "user", "content": INTRO + body + QUESTION}]


def passkey_sample(tokenizer, target_tokens: int, depth: float = 0.5,
                   seed: int = 0) -> PasskeySample:
    """The largest prompt of at most ``target_tokens`` templated tokens.

    ``tokenizer`` is a HF tokenizer with a chat template.  Deterministic in
    ``seed`` (the key) and ``depth`` (0 = start of the filler, 1 = end).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    key = str(random.Random(seed).randint(10000, 99999))

    def length(n: int) -> tuple[int, str]:
        text = tokenizer.apply_chat_template(_messages(n, depth, key), tokenize=False,
                                             add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]), text

    lo, hi = 0, 1
    while length(hi)[0] <= target_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # binary search on the number of filler repeats
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if length(mid)[0] <= target_tokens else (lo, mid)
    n_tokens, text = length(lo)
    if n_tokens > target_tokens:
        raise ValueError(f"target_tokens={target_tokens} is too small for a passkey prompt "
                         f"(needs at least {n_tokens})")
    return PasskeySample(prompt=text, messages=_messages(lo, depth, key), answer=key,
                         depth=depth, num_tokens=n_tokens)
