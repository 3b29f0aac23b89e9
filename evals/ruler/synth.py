"""RULER's synthetic tasks, generated offline and sized in the model's own tokens.

Reproduces NVIDIA/RULER's ``scripts/data/synthetic`` generators with the
templates of its ``constants.py`` and the defaults of its ``synthetic.yaml``:

* ``niah_*``: needles "One of the special magic {numbers} for {key} is: {value}."
  hidden in a haystack of repeated noise sentences (``noise``), of prose
  (``essay``) or of distractor needles (``needle``).  Keys are adjective-noun
  words, values 7-digit numbers or uuids; multikey / multivalue / multiquery
  add needles as RULER does.
* ``vt``: one chain of 4 variable assignments in noise, after one worked example.
* ``cwe`` / ``fwe``: common-words and frequent-words extraction.
* ``passkey``: the prompt of ``kvplug.evals.passkey`` as a one-needle task.

A sample is ``context`` (instructions, haystack, closing newline),
``question`` and ``answer_prefix``.  Its prompt is RULER's text
``context + question + answer_prefix``, or the model's chat template over a
user turn ``context + question`` and an assistant turn started with
``answer_prefix`` -- what lm-eval's ``--apply_chat_template`` renders.  The
prompt is sized in the chat-templated form when the tokenizer has a chat
template: prompt tokens plus the task's generation tokens (RULER's
``tokens_to_generate``) fit ``max_length``, and come within 1% of it (within a
few tokens, but for cwe, whose list grows by three entries at a time).

Deviations from RULER, for offline use and exact sizing:

* the essay haystack is ``data/essays.txt`` (prose written for kvplug) instead
  of Paul Graham's essays; like RULER it repeats when a length needs more;
* every haystack draws needle depths from RULER's 40-point grid (RULER does so
  for essays only; noise and needle haystacks get uniform random lines);
* the haystack's last line is cut at a character, so prompts land within a few
  tokens of their budget (a uuid distractor line is ~80 tokens);
* vt's worked example is sized to 500 tokens as in RULER, or to a third of
  the budget when that is less (lengths under ~1.6k), so short lengths fit;
* past wonderwords' ~8.7k words cwe adds adjective-noun words (RULER falls back
  to a larger English word list it downloads).
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cache
from itertools import chain, cycle, islice, repeat
from pathlib import Path

from kvplug.evals import passkey

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_ANSWER = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} "
    "in the text above.")
VT_ANSWER = (" Answer: According to the chain(s) of variable assignment in the text above, "
             "{num_v} variables are assigned the value {query}, they are: ")
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?")
CWE_ANSWER = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
    "Please ignore the dots '....'. What are the three most frequently appeared words in the "
    "above coded text?")
FWE_ANSWER = (" Answer: According to the coded text above, the three most frequently "
              "appeared words are:")

NOISE = passkey.FILLER.strip()  # RULER's noise haystack is the passkey filler
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.linspace(0, 100, 40), rounded
ESSAYS = Path(__file__).parent / "data" / "essays.txt"


@dataclass(frozen=True)
class Sample:
    """One prompt, split so that a harness can compress ``context`` before the question."""

    task: str
    max_length: int       # prompt tokens + gen_tokens fit this
    index: int            # sample number within (task, max_length)
    context: str          # instructions and haystack, ending in a newline
    question: str
    answer_prefix: str    # starts the reply (RULER's answer_prefix, leading space included)
    outputs: list[str]    # references, scored with string_match_all
    needles: list[str]    # needle sentences, in order of appearance
    depths: list[int]     # depth of each needle, % of the haystack's lines
    needle_offsets: list[int]  # character offset of each needle in ``context``
    gen_tokens: int       # generation budget (RULER's tokens_to_generate)
    num_tokens: int       # prompt tokens, sized form
    context_tokens: int   # tokens of the sized prompt up to the end of ``context``
    chat: bool            # whether the sized form is the chat-templated one

    @property
    def input(self) -> str:
        """The user's text: context then question."""
        return self.context + self.question

    def prompt(self, tokenizer, chat: bool) -> str:
        """The prompt text, raw (RULER's) or chat-templated."""
        return render_prompt(tokenizer, self.input, self.answer_prefix, chat)


def render_prompt(tokenizer, text: str, answer_prefix: str, chat: bool) -> str:
    """``text + answer_prefix``, or the chat template over a user turn and a started reply.

    The chat form is what lm-eval renders with ``--apply_chat_template`` and
    ``gen_prefix = answer_prefix.lstrip()``: the assistant turn is continued.
    """
    if not chat:
        return text + answer_prefix
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text},
         {"role": "assistant", "content": answer_prefix.lstrip()}],
        tokenize=False, continue_final_message=True)


class _Tokens:
    """The model's tokenizer plus the caches that keep sizing to a few full tokenizations."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer, self.chat = tokenizer, chat
        self._pieces: dict[str, int] = {}
        self._numbered = [0]  # _numbered[n]: tokens of " 1." ... f" {n}."

    def count(self, text: str, chat: bool) -> int:
        """Tokens of a prompt: a raw one gets special tokens, a templated one has them."""
        return len(self.tokenizer(text, add_special_tokens=not chat, verbose=False)["input_ids"])

    def pieces(self, texts: list[str], keep: bool = True) -> list[int]:
        """Token counts of short pieces; ``keep`` caches pieces that recur across samples."""
        new = [t for t in dict.fromkeys(texts) if t not in self._pieces]
        found = {}
        if new:
            ids = self.tokenizer(new, add_special_tokens=False, verbose=False)["input_ids"]
            found = dict(zip(new, map(len, ids)))
            if keep:
                self._pieces.update(found)
        return [self._pieces[t] if t in self._pieces else found[t] for t in texts]

    def numbered(self, n: int) -> int:
        """Tokens of the numbers " 1." to f" {n}." of a numbered list."""
        while len(self._numbered) <= n:
            start = len(self._numbered)
            counts = self.pieces([f" {i}." for i in range(start, 2 * start + 1024)], keep=False)
            for c in counts:
                self._numbered.append(self._numbered[-1] + c)
        return self._numbered[n]


@dataclass(frozen=True)
class _Frame:
    """What surrounds the sized body: RULER's template around the haystack, and the answers."""

    head: str
    question: str
    answer_prefix: str
    outputs: list[str]
    needles: list[str]
    depths: list[int]

    def input(self, body: str) -> str:
        return self.head + body + "\n" + self.question


class _Haystack:
    """Filler lines with the needles between them; size = characters of filler."""

    lo = 0

    def __init__(self, tokens: _Tokens, lines: Iterator[str], sep: str, needles: list[str],
                 depths: list[int], keep: bool = True):
        self.tokens, self.source, self.sep, self.keep = tokens, lines, sep, keep
        self.needles, self.depths = needles, depths
        self.lines: list[str] = []
        self.chars, self.toks = [0], [0]  # cumulative over self.lines

    def _split(self, n: int) -> tuple[int, str]:
        """Lines wholly inside the first ``n`` characters, and the cut next line."""
        while self.chars[-1] <= n:
            batch = list(islice(self.source, 256))
            counts = self.tokens.pieces([self.sep + line for line in batch], self.keep)
            for line, c in zip(batch, counts):
                self.lines.append(line)
                self.chars.append(self.chars[-1] + len(line))
                self.toks.append(self.toks[-1] + c)
        k = bisect_right(self.chars, n) - 1
        return k, self.lines[k][: n - self.chars[k]].rstrip()

    def tokens_of(self, n: int) -> int:
        k, cut = self._split(n)
        return self.toks[k] + (self.tokens.pieces([self.sep + cut], keep=False)[0] if cut else 0)

    def render(self, n: int) -> tuple[str, list[int]]:
        k, cut = self._split(n)
        lines = self.lines[:k] + ([cut] if cut else [])
        at = [int(len(lines) * d / 100) for d in self.depths]  # RULER's insertion points
        pieces, offsets, pos, j = [], [], 0, 0
        for i in range(len(lines) + 1):
            while j < len(self.needles) and at[j] == i:
                offsets.append(pos)
                pieces.append(self.needles[j])
                pos += len(self.needles[j]) + len(self.sep)
                j += 1
            if i < len(lines):
                pieces.append(lines[i])
                pos += len(lines[i]) + len(self.sep)
        return self.sep.join(pieces), offsets


def _numbered(words: Sequence[str]) -> str:
    """RULER's list format: "1. word 2. word ..."."""
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


class _WordList:
    """cwe's numbered list: the first ``num_cw`` words ``rc`` times, the rest ``ru`` times."""

    def __init__(self, tokens: _Tokens, words: Iterator[str], rc: int, ru: int, num_cw: int,
                 seed: int):
        self.tokens, self.source, self.rc, self.ru, self.lo, self.seed = (
            tokens, words, rc, ru, num_cw, seed)
        self.words: list[str] = []
        self.toks = [0]

    def _grow(self, n: int) -> None:
        while len(self.words) < n:
            batch = list(islice(self.source, 512))
            for c in self.tokens.pieces([" " + w for w in batch], keep=False):
                self.toks.append(self.toks[-1] + c)
            self.words += batch

    def tokens_of(self, n: int) -> int:
        self._grow(n)
        entries = self.lo * self.rc + (n - self.lo) * self.ru
        return (self.tokens.numbered(entries) + self.rc * self.toks[self.lo]
                + self.ru * (self.toks[n] - self.toks[self.lo]))

    def render(self, n: int) -> tuple[str, list[int]]:
        self._grow(n)
        entries = self.words[:self.lo] * self.rc + self.words[self.lo:n] * self.ru
        random.Random(self.seed).shuffle(entries)
        return _numbered(entries), []


class _CodedText:
    """fwe's text: the k-th coded word ``int(n * k**-2 / zeta(2))`` times, shuffled."""

    lo = 0

    def __init__(self, tokens: _Tokens, vocab: list[str], seed: int):
        self.vocab, self.seed = vocab, seed
        self.toks = tokens.pieces([" " + w for w in vocab], keep=False)

    def _counts(self, n: int) -> list[int]:
        return [int(n * k ** -2.0 / (math.pi ** 2 / 6)) for k in range(1, len(self.vocab) + 1)]

    def tokens_of(self, n: int) -> int:
        return sum(c * t for c, t in zip(self._counts(n), self.toks))

    def render(self, n: int) -> tuple[str, list[int]]:
        words = [w for w, c in zip(self.vocab, self._counts(n)) for _ in range(c)]
        random.Random(self.seed).shuffle(words)
        return " ".join(words), []


def _last_true(ok: Callable[[int], bool], lo: int) -> int:
    """Largest ``n >= lo`` with ``ok(n)``, for ``ok`` true up to some point (galloping search)."""
    step = 1
    while ok(lo + step):
        lo, step = lo + step, step * 2
    hi = lo + step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _fit(tokens: _Tokens, frame: _Frame, body, budget: int, chat: bool) -> tuple[int, int]:
    """The body size whose prompt is the longest within ``budget`` tokens, and its tokens.

    Searches on the body's cached token estimate, then corrects the estimate by
    the error of a full tokenization until the error stops changing (exact
    for byte-level BPE, usually one or two rounds for others).
    """
    def real(n: int) -> int:
        prompt = render_prompt(tokens.tokenizer, frame.input(body.render(n)[0]),
                               frame.answer_prefix, chat)
        return tokens.count(prompt, chat)

    smallest = real(body.lo)
    if smallest > budget:
        raise ValueError(f"a {budget}-token budget is too small for this task "
                         f"(its smallest prompt has {smallest} tokens)")
    base = smallest - body.tokens_of(body.lo)  # the prompt's tokens outside the body
    best, best_tokens, err = body.lo, smallest, 0
    for _ in range(6):
        n = _last_true(lambda m: base + err + body.tokens_of(m) <= budget, body.lo)
        got = real(n)
        if got <= budget and got > best_tokens:
            best, best_tokens = n, got
        new_err = got - base - body.tokens_of(n)
        if new_err == err and got <= budget:
            break
        err = new_err
    return best, best_tokens


def _random_value(rng: random.Random, kind: str) -> str:
    """RULER's needle keys and values: adjective-noun words, 7-digit numbers or uuids."""
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":
        adjectives, nouns = _wonderwords("adjectivelist.txt"), _wonderwords("nounlist.txt")
        return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


@cache
def _wonderwords(name: str) -> tuple[str, ...]:
    """One of wonderwords' word lists, the source of RULER's words."""
    from wonderwords import RandomWord

    return tuple(RandomWord.read_words(name))


@cache
def _cwe_pool() -> tuple[str, ...]:
    """RULER's cwe vocabulary: wonderwords' nouns, adjectives and verbs, sorted."""
    return tuple(sorted({w for name in ("nounlist.txt", "adjectivelist.txt", "verblist.txt")
                         for w in _wonderwords(name)}))


@cache
def _essay_sentences() -> tuple[str, ...]:
    """The shipped prose as sentences, whitespace collapsed as RULER does for its essays."""
    text = re.sub(r"\s+", " ", ESSAYS.read_text(encoding="utf-8")).strip()
    return tuple(re.split(r"(?<=[.!?]) ", text))


def _split_template(template: str, **fields) -> tuple[str, str]:
    """RULER's template as (head before the haystack, question after it)."""
    head, tail = template.split("{context}\n")
    return head.format(**fields), tail.format(**fields)


def _singular(text: str) -> str:
    """RULER's rewording for a single answer (niah.py does the same string replacements)."""
    return (text.replace("Some", "A").replace("are all", "is").replace("are", "is")
            .replace("answers", "answer"))


@dataclass(frozen=True)
class Passkey:
    """``kvplug.evals.passkey``'s prompt: a 5-digit key in repeated filler."""

    gen_tokens: int = 32  # not a RULER task; a key is a handful of tokens

    def make(self, rng: random.Random, max_length: int, tokens: _Tokens):
        key = str(rng.randint(10000, 99999))
        question, _, prefix = passkey.QUESTION.strip().partition("? ")
        needle = passkey.NEEDLE.format(key=key).strip()
        depths = [rng.choice(DEPTHS)]
        frame = _Frame(passkey.INTRO, question + "?", " " + prefix, [key], [needle], depths)
        return frame, _Haystack(tokens, repeat(NOISE), " ", [needle], depths)


@dataclass(frozen=True)
class Niah:
    """RULER's needle-in-a-haystack family (``niah.py``)."""

    haystack: str         # noise | essay | needle
    type_k: str = "words"
    type_v: str = "numbers"
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1
    gen_tokens: int = 128

    def make(self, rng: random.Random, max_length: int, tokens: _Tokens):
        keys: list[str] = []
        while len(keys) < max(self.num_k, self.num_q):
            key = _random_value(rng, self.type_k)
            keys += [key] if key not in keys else []
        values = [[_random_value(rng, self.type_v) for _ in range(self.num_v)] for _ in keys]
        needles = [NIAH_NEEDLE.format(type_needle_v=self.type_v, key=k, value=v)
                   for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)
        asked = rng.sample(range(len(keys)), self.num_q)
        queries = [keys[i] for i in asked]
        query = queries[0] if len(queries) == 1 else f"{', '.join(queries[:-1])}, and {queries[-1]}"
        template, answer, type_v = NIAH_TEMPLATE, NIAH_ANSWER, self.type_v
        if self.num_q * self.num_v == 1:
            template, answer, type_v = _singular(template), _singular(answer), type_v[:-1]
        head, question = _split_template(template, type_needle_v=type_v, query=query)
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        frame = _Frame(head, question, answer.format(type_needle_v=type_v, query=query),
                       [v for i in asked for v in values[i]], needles, depths)
        lines = {"noise": lambda: repeat(NOISE), "essay": lambda: cycle(_essay_sentences()),
                 "needle": lambda: self._distractors(random.Random(rng.getrandbits(64)), keys)}
        sep = " " if self.haystack == "essay" else "\n"
        return frame, _Haystack(tokens, lines[self.haystack](), sep, needles, depths,
                                keep=self.haystack != "needle")

    def _distractors(self, rng: random.Random, keys: list[str]) -> Iterator[str]:
        """RULER's ``needle`` haystack: needles for other keys (none equal to a real key)."""
        while True:
            key = _random_value(rng, self.type_k)
            if key not in keys:
                yield NIAH_NEEDLE.format(type_needle_v=self.type_v, key=key,
                                         value=_random_value(rng, self.type_v))


@dataclass(frozen=True)
class VariableTracking:
    """RULER's ``variable_tracking.py``: a chain of assignments in noise, after one example."""

    num_hops: int = 4
    gen_tokens: int = 30

    def make(self, rng: random.Random, max_length: int, tokens: _Tokens):
        budget = max_length - self.gen_tokens
        frame, body = self._instance(rng, tokens, letters=3)  # RULER's worked example
        n, _ = _fit(tokens, frame, body, min(500, budget // 3), chat=False)
        example = (frame.input(body.render(n)[0]) + frame.answer_prefix + " "
                   + " ".join(frame.outputs) + "\n")
        frame, body = self._instance(rng, tokens, letters=5)
        return replace(frame, head=example + "\n" + frame.head), body

    def _instance(self, rng: random.Random, tokens: _Tokens, letters: int):
        names: list[str] = []
        while len(names) < self.num_hops + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=letters))
            names += [name] if name not in names else []
        value = str(rng.randint(10000, 99999))
        hops = [f"VAR {names[0]} = {value}"] + [  # RULER's lines, trailing spaces included
            f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(self.num_hops)]
        head, question = _split_template(VT_TEMPLATE, query=value)
        depths = sorted(rng.sample(DEPTHS, len(hops)))
        frame = _Frame(head, question, VT_ANSWER.format(num_v=len(names), query=value), names,
                       hops, depths)
        return frame, _Haystack(tokens, repeat(NOISE), "\n", hops, depths)


@dataclass(frozen=True)
class CommonWords:
    """RULER's ``common_words_extraction.py``: the 10 most repeated words of a numbered list."""

    num_cw: int = 10
    gen_tokens: int = 120

    def make(self, rng: random.Random, max_length: int, tokens: _Tokens):
        long = max_length >= 4096  # RULER's switch between its two configurations
        rc, ru = (30, 3) if long else (6, 1)
        ex_n, ex_rc, ex_ru = (40, 10, 3) if long else (20, 3, 1)
        head, question = _split_template(CWE_TEMPLATE)
        ex_words = rng.sample(_cwe_pool(), ex_n)
        ex_entries = ex_words[:self.num_cw] * ex_rc + ex_words[self.num_cw:] * ex_ru
        rng.shuffle(ex_entries)
        example = (head + _numbered(ex_entries) + "\n" + question + CWE_ANSWER + " "
                   + _numbered(ex_words[:self.num_cw]))
        words = self._words(random.Random(rng.getrandbits(64)))
        common = list(islice(words, self.num_cw))
        frame = _Frame(example + "\n" + head, question, CWE_ANSWER, common, [], [])
        return frame, _WordList(tokens, chain(common, words), rc, ru, self.num_cw,
                                rng.getrandbits(64))

    @staticmethod
    def _words(rng: random.Random) -> Iterator[str]:
        """Distinct words: wonderwords' in random order, then adjective-noun words."""
        pool = list(_cwe_pool())
        rng.shuffle(pool)
        yield from pool
        seen = set(pool)
        while True:
            word = _random_value(rng, "words")
            if word not in seen:
                seen.add(word)
                yield word


@dataclass(frozen=True)
class FrequentWords:
    """RULER's ``freq_words_extraction.py``: the 3 most frequent coded words of a Zipf text."""

    coded_wordlen: int = 6
    gen_tokens: int = 50

    def make(self, rng: random.Random, max_length: int, tokens: _Tokens):
        size = (max_length - self.gen_tokens) // 50  # RULER's vocab_size default
        vocab: set[str] = set()
        while len(vocab) < size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=self.coded_wordlen)))
        vocab = sorted(vocab)
        rng.shuffle(vocab)
        vocab[0] = "..."  # the most frequent word is noise, as in RULER
        head, question = _split_template(FWE_TEMPLATE)
        frame = _Frame(head, question, FWE_ANSWER, vocab[1:4], [], [])
        return frame, _CodedText(tokens, vocab, rng.getrandbits(64))


TASKS = {
    "passkey": Passkey(),
    "niah_single_1": Niah("noise"),
    "niah_single_2": Niah("essay"),
    "niah_single_3": Niah("essay", type_v="uuids"),
    "niah_multikey_1": Niah("essay", num_k=4),
    "niah_multikey_2": Niah("needle"),
    "niah_multikey_3": Niah("needle", type_k="uuids", type_v="uuids"),
    "niah_multivalue": Niah("essay", num_v=4),
    "niah_multiquery": Niah("essay", num_q=4),
    "vt": VariableTracking(),
    "cwe": CommonWords(),
    "fwe": FrequentWords(),
}


def _sample(task: str, tokens: _Tokens, max_length: int, index: int, seed: int) -> Sample:
    spec = TASKS[task]
    rng = random.Random(f"{seed}:{task}:{max_length}:{index}")
    try:
        frame, body = spec.make(rng, max_length, tokens)
        n, num_tokens = _fit(tokens, frame, body, max_length - spec.gen_tokens, tokens.chat)
    except ValueError as e:
        raise ValueError(f"{task} at max_length={max_length}: {e}") from None
    text, offsets = body.render(n)
    context = frame.head + text + "\n"
    prompt = render_prompt(tokens.tokenizer, context + frame.question, frame.answer_prefix,
                           tokens.chat)
    after = prompt[prompt.rindex(frame.question):]  # question, reply start, template tail
    return Sample(
        task=task, max_length=max_length, index=index, context=context, question=frame.question,
        answer_prefix=frame.answer_prefix, outputs=list(frame.outputs),
        needles=list(frame.needles), depths=list(frame.depths),
        needle_offsets=[len(frame.head) + o for o in offsets], gen_tokens=spec.gen_tokens,
        num_tokens=num_tokens, context_tokens=num_tokens - tokens.count(after, chat=True),
        chat=tokens.chat)


def generate(task: str, tokenizer, max_lengths: Sequence[int], num_samples: int,
             seed: int = 42, chat: bool | None = None, first_sample: int = 0) -> list[Sample]:
    """Samples ``first_sample ..`` ``first_sample + num_samples - 1`` of ``task`` per
    length, interleaved across lengths.

    Sample ``i`` of every length precedes sample ``i + 1`` of any, so a harness's
    ``--limit`` still covers each length.  Each sample is seeded by ``(seed,
    task, max_length, index)``: the same arguments give the same samples, and
    a range of indices is a slice of a longer run's samples.
    ``chat`` sizes on the chat-templated prompt; by default, when the tokenizer
    has a chat template.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if chat is None:
        chat = getattr(tokenizer, "chat_template", None) is not None
    tokens = _Tokens(tokenizer, chat)
    return [_sample(task, tokens, length, i, seed)
            for i in range(first_sample, first_sample + num_samples) for length in max_lengths]
