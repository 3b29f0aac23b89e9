"""The ``replay`` stage on HF transformers: after a context's prefill, the model reads the
context again as the policy's replay prompts say, and the policy scores the context by
that reading (KVzip's context reconstruction).

:func:`replay_context` runs it over a :class:`~kvplug.integrations.hf_compression.CompressedCache`
holding the dense context: the query-agnostic protocol calls it after the context's
prefill (``compress_context``), ``generate`` after the prompt's (``GenerationMixin._prefill``
wrapped by ``register``), so the first generated token comes from the dense prompt, as
with every policy that compresses at prefill.  What the replay reads:
:mod:`kvplug.integrations.replay`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvplug.integrations.hf_compression import CompressedCache
from kvplug.integrations.replay import replay_chunks, tokenizer_for


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
    chunks = replay_chunks(cache.policy, context_ids.cpu(), tokenizer)
    decoder = model.get_decoder()
    with torch.no_grad():
        for chunk in chunks:
            positions = torch.arange(held, held + chunk.input_ids.shape[1],
                                     device=context_ids.device).expand(context_ids.shape[0], -1)
            with cache.replaying(chunk):
                decoder(input_ids=chunk.input_ids.to(context_ids.device), position_ids=positions,
                        past_key_values=cache, use_cache=True)
    cache.compress_replayed()
