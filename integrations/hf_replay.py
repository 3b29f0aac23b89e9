"""The ``replay`` stage on HF transformers: after a context's prefill, the model reads the
context again as the policy's replay prompts say, and the policy scores the context by
that reading (KVzip's context reconstruction).

:func:`replay_context` runs it over a :class:`~kvplug.integrations.hf_compression.CompressedCache`
holding the dense context: the query-agnostic protocol calls it after the context's
prefill (``compress_context``), ``generate`` after the prompt's (``GenerationMixin._prefill``
wrapped by ``register``), so the first generated token comes from the dense prompt, as
with every policy that compresses at prefill.  The replay prompts end a user turn and
open the reply with the tokenizer's chat template, and the template's preamble (system
prompt, start of the user turn) is not replayed.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from kvplug.integrations.hf_compression import CompressedCache

_MARKER = "kvplug-replayed-context"   # stands for the context in the chat template


@functools.lru_cache(maxsize=4)
def tokenizer_for(path: str):
    """The tokenizer saved with the model at ``path``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def chat_turn(tokenizer) -> tuple[list[int], list[int]]:
    """What the chat template puts before a user message (its preamble) and after it (end
    of the turn, start of the reply); no preamble and a newline without a template."""
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    if getattr(tokenizer, "chat_template", None) is None:
        return [], encode("\n")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARKER}],
                                         add_generation_prompt=True, tokenize=False)
    before, _, after = text.partition(_MARKER)
    return encode(before), encode(after)


def replay_context(model: torch.nn.Module, cache: CompressedCache, context_ids: Tensor,
                   tokenizer=None) -> None:
    """Run the cache's policy's replay of ``context_ids`` (``[B, N]``, what the cache holds
    dense) through ``model``'s decoder, then compress the cache; nothing when the cache
    awaits no replay (the budget kept the whole prompt).  ``tokenizer``: the model's,
    loaded from its path when None."""
    if not cache.awaits_replay:
        return
    held = cache.get_seq_length()
    if context_ids.shape[1] != held:
        raise ValueError(f"replay of a {context_ids.shape[1]}-token context over a cache "
                         f"holding {held} tokens: pass the tokens the cache was filled with")
    if tokenizer is None:
        tokenizer = tokenizer_for(model.config._name_or_path)
    preamble, turn_end = chat_turn(tokenizer)
    starts_with_preamble = (len(preamble) < held and bool(
        (context_ids[:, :len(preamble)].cpu() == torch.tensor(preamble)).all()))
    scored_from = len(preamble) if starts_with_preamble else 0
    chunks = cache.policy.replay_chunks(
        context_ids.cpu(), scored_from,
        functools.partial(tokenizer.encode, add_special_tokens=False), turn_end)
    decoder = model.get_decoder()
    with torch.no_grad():
        for chunk in chunks:
            positions = torch.arange(held, held + chunk.input_ids.shape[1],
                                     device=context_ids.device).expand(context_ids.shape[0], -1)
            with cache.replaying(chunk):
                decoder(input_ids=chunk.input_ids.to(context_ids.device), position_ids=positions,
                        past_key_values=cache, use_cache=True)
    cache.compress_replayed()
