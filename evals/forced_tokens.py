"""Teacher forcing through a vLLM engine: a request samples given tokens, one per step.

vLLM computes a request's returned logprobs (``logprobs_mode="raw_logprobs"``, its
default) from the model's logits before any logits processor, so the logprob of each
forced token is the model's own: the NLL of a text read through the engine's decode path
and KV store, as a user's generation reads it (a prompt's ``prompt_logprobs`` would read it
as a prefill instead).

Start the engine with ``logits_processors=[FQCN]``; :func:`forced_params` builds a
request's sampling parameters.
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

FQCN = "kvplug.evals.forced_tokens:ForcedTokens"
_KEY = "kvplug_forced_tokens"


def forced_params(tokens: list[int]) -> SamplingParams:
    """Sampling parameters of a request that outputs exactly ``tokens``, with each one's
    logprob."""
    if not tokens:
        raise ValueError("forced_params: at least one token to force")
    return SamplingParams(temperature=0.0, max_tokens=len(tokens), min_tokens=len(tokens),
                          ignore_eos=True, logprobs=0, detokenize=False,
                          extra_args={_KEY: [int(t) for t in tokens]})


class ForcedTokens(AdapterLogitsProcessor):
    """Leaves one finite logit per step: the request's next forced token."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams):
        tokens = (params.extra_args or {}).get(_KEY)
        if tokens is None:
            return None

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            forced = torch.full_like(logits, float("-inf"))
            forced[tokens[len(output_ids)]] = 0.0
            return forced

        return force
