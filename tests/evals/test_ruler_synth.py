"""The offline RULER generators: determinism, sizing, needle placement, RULER's task contents."""

import re
from collections import Counter

import pytest

from kvplug.evals.ruler import synth

LENGTHS = [1024, 4096]
NEEDLE_TASKS = [t for t in synth.TASKS if t not in ("cwe", "fwe")]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def samples(tokenizer):
    """Two samples per task at each of LENGTHS, generated once for the whole module."""
    return {task: synth.generate(task, tokenizer, LENGTHS, 2) for task in synth.TASKS}


def _count(tokenizer, text, special):
    return len(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


@pytest.mark.parametrize("task", list(synth.TASKS))
def test_same_seed_same_samples_interleaved_across_lengths(task, tokenizer, samples):
    again = synth.generate(task, tokenizer, LENGTHS, 2)
    assert again == samples[task]
    assert [(s.index, s.max_length) for s in again] == [(0, 1024), (0, 4096), (1, 1024), (1, 4096)]
    other = synth.generate(task, tokenizer, [1024], 1, seed=7)[0]
    assert other.context != again[0].context or other.outputs != again[0].outputs


@pytest.mark.parametrize("task", list(synth.TASKS))
def test_prompt_plus_generation_within_1_percent_of_length(task, tokenizer, samples):
    for s in samples[task]:
        assert s.chat, "SmolLM2 has a chat template: sizing must count it"
        prompt = s.prompt(tokenizer, chat=True)
        assert _count(tokenizer, prompt, special=False) == s.num_tokens
        assert 0.99 * s.max_length <= s.num_tokens + s.gen_tokens <= s.max_length, s.num_tokens
        # the raw prompt (no template) fits too
        assert _count(tokenizer, s.prompt(tokenizer, chat=False), special=True) <= s.num_tokens


@pytest.mark.parametrize("task", list(synth.TASKS))
def test_context_tokens_end_where_the_question_starts(task, tokenizer, samples):
    s = samples[task][0]
    prompt = s.prompt(tokenizer, chat=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[:s.context_tokens]) == prompt[:prompt.rindex(s.question)]
    assert s.context.endswith("\n") and not s.question.startswith("\n")


HEAD_ENDS = ("afterwards.\n", "in the following text.\n\n", "important information there.\n\n")


def _units(task: str, filler: str) -> list[str]:
    """The haystack's lines as the generator counts them: lines, essay sentences, passkey fillers."""
    if task == "passkey":
        parts = re.split(r"(?<=again\.) ", filler)
    elif getattr(synth.TASKS[task], "haystack", "") == "essay":
        parts = re.split(r"(?<=[.!?]) ", filler)
    else:
        parts = filler.split("\n")
    return [p for p in parts if p.strip()]


@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_each_needle_once_before_line_int_lines_times_depth(task, samples):
    """A needle occurs once, at its offset, before filler line int(lines * depth / 100) (RULER's)."""
    for s in samples[task]:
        assert s.needle_offsets == sorted(s.needle_offsets) and s.depths == sorted(s.depths)
        assert all(d in synth.DEPTHS for d in s.depths)
        start = max(s.context.rfind(h) + len(h) for h in HEAD_ENDS if h in s.context)

        def filler(text):
            for needle in s.needles:
                text = text.replace(needle, "")
            return text

        lines = len(_units(task, filler(s.context[start:-1])))
        for needle, offset, depth in zip(s.needles, s.needle_offsets, s.depths):
            assert s.context.count(needle) == 1
            assert s.context[offset:offset + len(needle)] == needle
            assert len(_units(task, filler(s.context[start:offset]))) == int(lines * depth / 100)


def test_niah_prompts_are_rulers(samples):
    s = samples["niah_single_1"][0]
    key = re.search(r"for (\S+) mentioned", s.question).group(1)
    (value,) = s.outputs
    assert s.context.startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\nThe grass is green.")
    assert s.question == f"What is the special magic number for {key} mentioned in the provided text?"
    assert s.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    assert s.needles == [f"One of the special magic numbers for {key} is: {value}."]
    assert re.fullmatch(r"\d{7}", value) and re.fullmatch(r"[\w' -]+-[\w' -]+", key)

    s = samples["niah_multivalue"][0]
    key = re.search(r"for (\S+) mentioned", s.question).group(1)
    assert s.question.startswith("What are all the special magic numbers for ")
    assert s.answer_prefix.endswith("mentioned in the provided text are")
    assert sorted(s.needles) == sorted(f"One of the special magic numbers for {key} is: {v}."
                                       for v in s.outputs) and len(s.outputs) == 4

    s = samples["niah_multiquery"][0]
    keys = re.search(r"for (.+) mentioned", s.question).group(1).replace(", and ", ", ").split(", ")
    assert len(keys) == 4 and len(s.outputs) == 4
    for key, value in zip(keys, s.outputs):
        assert f"One of the special magic numbers for {key} is: {value}." in s.needles

    s = samples["niah_multikey_1"][0]
    assert len(s.needles) == 4 and len(s.outputs) == 1

    s = samples["niah_multikey_3"][0]
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid, s.outputs[0])
    assert s.question.startswith("What is the special magic uuid for ")
    distractors = [line for line in s.context.split("\n")
                   if line.startswith("One of the special magic uuids") and line not in s.needles]
    assert len(distractors) > 5

    s = samples["niah_single_2"][0]  # the shipped prose, needles between its sentences
    assert "The best way to learn a city is to walk it without a plan." in s.context
    assert f" {s.needles[0]} " in s.context or s.depths[0] in (0, 100)


def test_vt_chain_and_example(samples):
    s = samples["vt"][0]
    value = re.search(r"assigned the value (\d{5}) in the text above", s.question).group(1)
    names = s.outputs
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    assert s.needles == [f"VAR {names[0]} = {value}"] + [
        f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(4)]
    assert s.answer_prefix == (" Answer: According to the chain(s) of variable assignment in the "
                               f"text above, 5 variables are assigned the value {value}, they are: ")
    example, main = s.context.split("\n\nMemorize and track")
    assert example.startswith("Memorize and track the chain(s) of variable assignment")
    assert re.search(r"they are:  [A-Z]{3}( [A-Z]{3}){4}$", example)


@pytest.mark.parametrize("length, repeats", [(1024, (6, 1)), (4096, (30, 3))])
def test_cwe_repeats_the_10_common_words(samples, length, repeats):
    s = next(s for s in samples["cwe"] if s.max_length == length)
    listing = s.context.rsplit("Memorize the ones that appear most often.\n", 1)[1]
    entries = re.split(r"(?:^| )\d+\. ", listing.rstrip("\n"))[1:]
    counts = Counter(entries)
    assert {w: counts[w] for w in s.outputs} == {w: repeats[0] for w in s.outputs}
    assert set(counts.values()) == set(repeats) and len(s.outputs) == 10
    assert s.answer_prefix == " Answer: The top 10 words that appear most often in the list are:"


def test_fwe_answers_are_the_three_most_frequent_words(samples):
    for s in samples["fwe"]:
        text = s.context.split("Find the three most frequently appeared coded words. ")[1]
        counts = Counter(text.split())
        assert counts.most_common(1)[0][0] == "..."
        assert [w for w, _ in counts.most_common(4)[1:]] == s.outputs


def test_passkey_is_evals_passkeys_prompt(samples):
    from kvplug.evals import passkey

    s = samples["passkey"][0]
    assert s.context.startswith(passkey.INTRO + passkey.FILLER.strip())
    assert s.question == "What is the pass key?" and s.answer_prefix == " The pass key is"
    assert s.needles == [passkey.NEEDLE.format(key=s.outputs[0]).strip()]


def test_too_short_a_length_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="cwe at max_length=512"):
        synth.generate("cwe", tokenizer, [512], 1)
    with pytest.raises(ValueError, match="unknown task"):
        synth.generate("qa_squad", tokenizer, [4096], 1)
