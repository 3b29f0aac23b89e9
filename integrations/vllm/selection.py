"""How vLLM comes to pick kvplug: the ``KVPLUG`` enum member, its pickling,
CPU backend selection and config validation at engine start.

vLLM 0.32 facts this relies on (see ``shared/research/vllm_plugin_memo.md``):
``--attention-backend`` resolves through ``AttentionBackendEnum[value.upper()]``;
an enum member added at runtime pickles by value, and spawned engine
processes unpickle the config before they load plugins; ``CpuPlatform``
ignores the selected backend and always answers CPU_ATTN.
"""

from __future__ import annotations

import functools
import logging

BACKEND_NAME = "KVPLUG"
CPU_BACKEND_PATH = "kvplug.integrations.vllm.cpu_backend.KVPlugCPUBackend"
CUDA_BACKEND_PATH = "kvplug.integrations.vllm.cuda_backend.KVPlugCudaBackend"
# KV block size kvplug picks for a selection or compressing policy on vLLM-cpu when the
# user sets none: the read unit of sparse decode and of freeing (vLLM-cpu's own default,
# 128, is too coarse for 1/16 of a 4k context); the CPU kernel needs a multiple of 32
SPARSE_BLOCK_SIZE = 32
# what to tell users whose model has layers kvplug does not handle
PER_KIND_HINT = ("""run those layers on vLLM's own backend and only full-attention layers on """
                 """kvplug: --attention-config '{"backend_per_kind": {"full_attention": "KVPLUG"}}' """
                 """(and no --attention-backend)""")

# a child of "vllm" so it shares vLLM's log handler and level
logger = logging.getLogger("vllm.kvplug")


def backend_path() -> str:
    from vllm.platforms import current_platform

    return CPU_BACKEND_PATH if current_platform.is_cpu() else CUDA_BACKEND_PATH


def _resolve_member(name: str, value: str):
    """Unpickle target: register the member first if this process has not yet."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if name not in AttentionBackendEnum.__members__:
        register_backend(name, value)
    return AttentionBackendEnum[name]


def register_backend_member():
    """Add ``AttentionBackendEnum.KVPLUG`` (idempotent) and make it picklable by name."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    member = _resolve_member(BACKEND_NAME, backend_path())
    object.__setattr__(member, "__reduce_ex__",
                       lambda proto, _m=member: (_resolve_member, (_m.name, _m.value)))
    return member


def is_kvplug(backend) -> bool:
    return backend is not None and getattr(backend, "name", None) == BACKEND_NAME


def uses_kvplug(vllm_config) -> bool:
    """True when the user asked for kvplug, globally or for some layer kind."""
    attn = vllm_config.attention_config
    return is_kvplug(attn.backend) or any(is_kvplug(b) for b in attn.backend_per_kind.values())


def check_layer_supported(selector_config) -> None:
    """Refuse layer kinds kvplug does not run, instead of running them wrongly."""
    from vllm.v1.attention.backend import AttentionType

    unsupported = []
    if selector_config.use_mla:
        unsupported.append("MLA")
    if selector_config.use_sparse:
        unsupported.append("sparse (indexer) attention")
    if selector_config.has_sliding_window:
        unsupported.append("sliding-window attention")
    if selector_config.has_sink:
        unsupported.append("attention sinks")
    if selector_config.attn_type != AttentionType.DECODER:
        unsupported.append(f"attention type {selector_config.attn_type!r}")
    if unsupported:
        raise ValueError(f"kvplug does not handle layers with {', '.join(unsupported)}; "
                         f"{PER_KIND_HINT}")


def patch_cpu_platform() -> None:
    """Make ``CpuPlatform`` honour ``KVPLUG``; every other choice is left to vLLM."""
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.get_attn_backend_cls.__func__
    if getattr(original, "_kvplug_wrapped", False):
        return

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if is_kvplug(selected_backend):
            check_layer_supported(attn_selector_config)
            return CPU_BACKEND_PATH
        return original(cls, selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls._kvplug_wrapped = True
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def patch_engine_config_validation() -> None:
    """Validate kvplug's config once, in the process that starts the engine.

    A bad policy then fails ``vllm serve`` / ``LLM(...)`` before any engine
    process is spawned, with the message naming the valid choices.
    """
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_kvplug_wrapped", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        if uses_kvplug(vllm_config):
            vllm_config = _check_policy(self, vllm_config, lambda: original(self, *args, **kwargs))
        return vllm_config

    create_engine_config._kvplug_wrapped = True
    EngineArgs.create_engine_config = create_engine_config


def _check_policy(engine_args, vllm_config, recreate):
    """Validate the policy against the engine; a selection policy gets small KV blocks."""
    from vllm.platforms import current_platform

    from kvplug.config import resolve_config
    from kvplug.integrations.capabilities import VLLM_CPU, VLLM_CUDA, check_engine
    from kvplug.integrations.vllm.lifecycle import WorkerPolicy, evicts_by_layer

    from kvplug.integrations.vllm.speculation import SELF_DRAFTER_PATH, is_self_drafting

    config = resolve_config(vllm_config.additional_config)
    policies = [c.build_policy() for c in config.policy_configs()]
    if config.store is not None:
        policies.append(config.store.build_policy())
    if (config.draft is not None) != is_self_drafting(vllm_config):
        raise ValueError(
            "kvplug self-speculation needs both the kvplug config's 'draft' policy and "
            f"--speculative-config '{{\"method\": \"custom_class\", \"model\": "
            f"\"{SELF_DRAFTER_PATH}\", \"num_speculative_tokens\": N}}'; got draft="
            f"{None if config.draft is None else config.draft.as_dict()} and "
            f"speculative_config={vllm_config.speculative_config}")
    if config.draft is not None:
        if not current_platform.is_cpu():
            raise ValueError("kvplug self-speculation (the config's 'draft') runs on vLLM-cpu "
                             "only: kvplug's CUDA backend plans no draft forwards")
        policies.append(config.draft.build_policy())
        gamma = vllm_config.speculative_config.num_speculative_tokens
        if config.first_tier is not None and config.first_tier.num_tokens >= gamma:
            raise ValueError(
                f"kvplug config first_tier num_tokens={config.first_tier.num_tokens}: a draft "
                f"forward checks a row's last token and at most num_speculative_tokens - 1 = "
                f"{gamma - 1} guesses after it (the drafts' KV slots); lower num_tokens or "
                "raise num_speculative_tokens")
    for policy in policies:
        check_engine(policy, VLLM_CPU if current_platform.is_cpu() else VLLM_CUDA)
    storing = [p.name for p in policies if "prefill_compress" in p.stages]
    workers = vllm_config.parallel_config.world_size
    if storing and len(policies) > 1 and workers > 1:
        raise ValueError(f"kvplug policy {storing[0]!r} frees blocks the scheduler plans by "
                         f"the policy the worker runs; with {workers} worker processes a "
                         "policy switch cannot reach the scheduler: leave switch_to empty")
    recompacting = [p.name for p in policies if "decode_compress" in p.stages]
    if recompacting and vllm_config.speculative_config is not None:
        raise ValueError(f"kvplug policy {recompacting[0]!r} compresses a request's KV again "
                         "each time a decoded token fills a block, one token a step; "
                         "speculative decoding is not supported with it")
    uneven = [p.name for p in policies if p.uneven_heads]
    if uneven and vllm_config.speculative_config is not None:
        raise ValueError(f"kvplug policy {uneven[0]!r} keeps each kv-head's pairs in cells of "
                         "its own, which kvplug reads for rows of one decode token; speculative "
                         "decoding is not supported with it")
    replaying = [p.name for p in policies if "replay" in p.stages]
    if replaying and workers > 1:
        raise ValueError(f"kvplug policy {replaying[0]!r} replays a request's context over the "
                         "engine steps after its prefill, while the scheduler holds the request; "
                         f"with {workers} worker processes the scheduler cannot see the "
                         "replays: run it with one worker")
    selecting = [p.name for p in policies if p.stages & {"select", "prefill_compress"}]
    # a packed pool keeps vLLM's block size: its per-page ranges cost less per token there
    packing = any(p.store == "quantized" for p in policies)
    if selecting and not packing:
        cache = vllm_config.cache_config
        if not cache.user_specified_block_size and cache.block_size != SPARSE_BLOCK_SIZE:
            engine_args.block_size = SPARSE_BLOCK_SIZE
            vllm_config = recreate()
            logger.info("kvplug: KV block size %d for policy %r (its read unit; set "
                        "--block-size to choose another multiple of 32)", SPARSE_BLOCK_SIZE,
                        selecting[0])
    model = vllm_config.model_config
    worker = WorkerPolicy(config, model.get_num_layers(vllm_config.parallel_config),
                          model.get_total_num_kv_heads(), vllm_config.cache_config.block_size,
                          workers)
    # the scheduler reads the worker's state (held replays, each layer's kept blocks, the
    # policy a switch queued), so the one worker runs in the engine core's process (vLLM-cpu
    # gives it a process of its own when multiprocessing is on)
    parallel = vllm_config.parallel_config
    if ((replaying or worker.layer_groups or (storing and len(policies) > 1))
            and workers == 1 and parallel.distributed_executor_backend == "mp"):
        parallel.distributed_executor_backend = "uni"
        logger.info("kvplug: policy %r: the scheduler reads the worker's request state, so "
                    "the worker runs in the engine core's process", worker.policy.name)
    by_layer = [p.name for p in policies if evicts_by_layer(p)]
    if by_layer and not worker.layer_groups:
        logger.info("kvplug: policy %r keeps a budget per layer, but every layer is in one "
                    "KV-cache group (layer_groups=%s, %d workers, policies %s): each layer "
                    "holds the largest layer budget", by_layer[0], config.layer_groups, workers,
                    [p.name for p in policies])
    if worker.layer_groups:
        logger.info("kvplug: policy %r keeps a budget per layer: each layer is a KV-cache "
                    "group of its own and frees its own blocks", worker.policy.name)
        cache = vllm_config.cache_config
        if cache.num_gpu_blocks_override:
            # a block of the pool then holds one layer's KV: the override keeps counting
            # blocks of every layer, the tokens the user sized the pool for
            cache.num_gpu_blocks_override *= worker.num_layers
            logger.info("kvplug: --num-gpu-blocks-override counts blocks of every layer: "
                        "%d one-layer blocks", cache.num_gpu_blocks_override)
    logger.info(config.describe())
    return vllm_config
