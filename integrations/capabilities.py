"""What each engine adapter runs: the stages and stores of docs/design.md.

A policy declares what it needs (``Policy.stages``, ``Policy.store``); an adapter
checks it against its own line here at engine start (``Policy.check_engine``), so
an unsupported pair is refused with a message instead of running dense.
"""

from __future__ import annotations

VLLM_CPU = "vLLM on CPU"
VLLM_CUDA = "vLLM on CUDA"
HF = "HF transformers"

# engine -> (stages it runs, stores it keeps)
ENGINES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    VLLM_CPU: (frozenset({"select", "prefill_compress", "layer_budgets", "decode_compress",
                          "replay"}),
               frozenset({"dense", "evicted", "merged", "quantized"})),
    VLLM_CUDA: (frozenset({"select"}), frozenset({"dense"})),
    HF: (frozenset({"select", "prefill_compress", "layer_budgets", "decode_compress", "replay"}),
         frozenset({"dense", "evicted", "merged", "lowrank", "quantized"})),
}


def check_engine(policy, engine: str) -> None:
    """``policy.check_engine`` against ``engine``'s line of :data:`ENGINES`."""
    stages, stores = ENGINES[engine]
    policy.check_engine(engine, stages, stores)


def supported_engines(policy) -> list[str]:
    """The engines of :data:`ENGINES` that run ``policy``."""
    runs = []
    for engine in ENGINES:
        try:
            check_engine(policy, engine)
        except ValueError:
            continue
        runs.append(engine)
    return runs


def what_it_saves(policy) -> str:
    """``memory``, ``bandwidth``, both or nothing, from what the policy declares: a policy
    that keeps less saves memory and reads less; one that selects reads less.  Where the
    saving depends on the engine (a store only some engines keep), the engines are named."""
    reads_less = "select" in policy.stages or "prefill_compress" in policy.stages
    if "prefill_compress" in policy.stages:
        return "memory and bandwidth"
    if policy.store != "dense":
        runs = supported_engines(policy)
        where = [e for e in runs if policy.store_on(ENGINES[e][1]) == policy.store]
        if where == runs:
            return "memory and bandwidth"
        return f"bandwidth; memory too on {', '.join(where)}"
    return "bandwidth" if reads_less else "nothing"
