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
see :mod:`kvplug.config`), and dispatches to the attention function registered
for it in :data:`ATTENTION_BY_POLICY`.

``full`` is transformers' own ``sdpa_attention_forward`` behind transformers'
own SDPA mask, so its outputs are identical to ``attn_implementation="sdpa"``.
A sparse policy plugs in by adding one entry with the same signature: it gets
the whole cache for the layer (``key``/``value``, all heads) and its policy
object, and chooses which KV positions each query reads.  Decode-time
selection policies without an entry share :func:`_selection_attention`;
``shadowkv`` has its own, which keeps the prompt's keys as a low-rank store
per generate call (:func:`_shadowkv_attention`).

Per-request KV accounting (``Policy.account_step``) is not done here: HF
``generate`` has no request lifecycle to hook without patching it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from kvplug.config import resolve_config
from kvplug.kernels import (chunk_summaries, landmarks, lowrank_rope_keys, rope_inv_freq,
                            sparse_paged_decode)
from kvplug.policies import (KeySummary, Policy, SelectionPolicy, ShadowKV, StepContext,
                             SummarySpec, build_policy)
from kvplug.policies.shadowkv import lowrank_keys, undo_rope

ATTN_IMPLEMENTATION = "kvplug"
_POLICY_ATTR = "kvplug_policy"  # set on each attention module by attach_policy


def _full_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None, *,
                    policy: Policy, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Dense: exactly transformers' SDPA path, so ``full`` is the bit-exact baseline."""
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _hf_summary(spec: SummarySpec | None, keys: torch.Tensor) -> KeySummary | None:
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


def _bind(policy: Policy, config) -> int:
    """``policy.check_model`` for an HF model config (read unit: one token); the depth."""
    policy.check_model(config.num_hidden_layers, config.num_key_value_heads, 1)
    return config.num_hidden_layers


def _step_context(module: torch.nn.Module, policy: Policy) -> StepContext:
    """The policy's per-step context; a new decode step starts at layer 0."""
    ctx = _STEP_CONTEXTS.get(id(policy))
    if ctx is None:
        ctx = _STEP_CONTEXTS[id(policy)] = StepContext(unit=1, num_layers=_bind(policy, module.config))
    if module.layer_idx == 0:
        ctx.scratch.clear()
    return ctx


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
    if attention_mask is not None and not bool(attention_mask[..., -1, :].all()):
        raise ValueError(f"kvplug policy {policy.name!r} in the HF path needs unpadded batches "
                         "(batch size 1, or prompts of equal length)")
    keys = key.transpose(1, 2)                                   # [B, L, H_kv, D]
    layer = module.layer_idx
    ctx = _step_context(module, policy)
    seq_lens = torch.full((batch,), kv_len, device=query.device, dtype=torch.int64)
    summary = _hf_summary(policy.summary_spec(layer, ctx.unit), keys)
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
    if selection.dense_kv_heads is not None:
        dense, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        group = query.shape[1] // key.shape[1]
        dense_q_heads = selection.dense_kv_heads.to(query.device).repeat_interleave(group)
        out = torch.where(dense_q_heads[None, None, :, None], dense, out)
    return out, None


_STEP_CONTEXTS: dict[int, StepContext] = {}  # id(policy) -> its decode-step context


class _LowRankStore(NamedTuple):
    """What ShadowKV keeps of one layer's prompt (see :mod:`kvplug.policies.shadowkv`)."""

    prompt_len: int
    u: torch.Tensor            # [B, L, r]
    sv: torch.Tensor           # [B, r, H_kv * D]
    inv_freq: torch.Tensor     # [D / 2], the model's RoPE
    summary: KeySummary        # landmarks and min_cos of the prompt's chunks


# (id(policy), layer) -> the store of the latest prefill; replaced at the next one
_LOWRANK_STORES: dict[tuple[int, int], _LowRankStore] = {}


def _rope_inv_freq(config: Any, head_dim: int) -> torch.Tensor:
    """The model's RoPE frequencies; only plain (unscaled, full-width) RoPE can be undone here."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                  or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if (rope_type != "default" or not isinstance(theta, (int, float))
            or params.get("partial_rotary_factor", 1.0) != 1.0):
        raise ValueError(f"kvplug policy 'shadowkv' in the HF path stores pre-RoPE keys and "
                         f"supports plain RoPE only (rope_type 'default'); this model has "
                         f"{params or 'no rope_theta'}")
    return rope_inv_freq(head_dim, float(theta))


def _lowrank_store(module: torch.nn.Module, key: torch.Tensor, policy: ShadowKV) -> _LowRankStore:
    """ShadowKV's prefill: undo RoPE at ``0..L-1``, one SVD of the layer's keys, landmarks."""
    batch, heads, length, dim = key.shape
    inv_freq = _rope_inv_freq(module.config, dim).to(key.device)
    keys = key.transpose(1, 2)                                   # [B, L, H_kv, D] post-RoPE
    positions = torch.arange(length, device=key.device)[:, None]
    u, sv = lowrank_keys(undo_rope(keys, positions, inv_freq), policy.key_rank(heads, dim))
    summary = _hf_summary(policy.summary_spec(module.layer_idx, 1), keys)
    return _LowRankStore(length, u.to(key.dtype), sv.to(key.dtype), inv_freq, summary)


def _shadowkv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: torch.Tensor | None, *,
                        policy: ShadowKV, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """ShadowKV: dense prefill that builds the low-rank store; sparse decode that reads it.

    Each decode step attends to the prompt's local window, every generated
    token and the outlier chunks with exact keys, and to the top chunks with
    keys rebuilt from the store (values always exact): a copy of the layer's
    keys gets the rebuilt ones written in, and the paged kernel reads the key
    set from it.  The budget is the whole step's: what the generated tokens
    leave of it is spent on the prompt (dense when it covers the context).
    """
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    if attention_mask is not None and not bool(attention_mask[..., -1, :].all()):
        raise ValueError("kvplug policy 'shadowkv' in the HF path needs unpadded batches "
                         "(batch size 1, or prompts of equal length)")
    slot = (id(policy), module.layer_idx)
    if q_len > 1:
        if kv_len != q_len:
            raise ValueError("kvplug policy 'shadowkv' in the HF path compresses the prompt at "
                             f"its prefill, so the prompt must come in one forward; got {q_len} "
                             f"new tokens after {kv_len - q_len} cached ones")
        _LOWRANK_STORES[slot] = _lowrank_store(module, key, policy)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    store = _LOWRANK_STORES.get(slot)
    if store is None or store.u.shape[0] != batch or store.prompt_len >= kv_len:
        raise ValueError("kvplug policy 'shadowkv': a decode step of layer "
                         f"{module.layer_idx} without the prefill of its prompt (run generate, "
                         "or a forward over the whole prompt first)")
    generated = kv_len - store.prompt_len
    prompt_lens = torch.full((batch,), store.prompt_len, device=query.device, dtype=torch.int64)
    budgets = (policy.token_budgets(torch.full_like(prompt_lens, kv_len)) - generated).clamp_min(0)
    chosen = policy.choose(query[:, :, 0], store.summary, prompt_lens, budgets,
                           _step_context(module, policy).unit)
    if chosen is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    selection, rebuilt_ids = chosen
    chunk = selection.chunk_size
    pos = (rebuilt_ids.long()[..., None] * chunk
           + torch.arange(chunk, device=query.device)).flatten(2)               # [B, H_kv, N]
    pos = pos.masked_fill((rebuilt_ids < 0).repeat_interleave(chunk, dim=-1), -1)
    rebuilt = lowrank_rope_keys(store.u, store.sv, pos, store.inv_freq, out_dtype=key.dtype)
    keys = key.clone()
    b, h, n = (pos >= 0).nonzero(as_tuple=True)
    keys[b, h, pos[b, h, n]] = rebuilt[b, h, n]
    window = int(selection.n_recent.max()) + generated        # rows have one length here
    block_table = torch.arange(batch, device=query.device, dtype=torch.int32)[:, None]
    out = sparse_paged_decode(query[:, :, 0], keys.transpose(1, 2), value.transpose(1, 2),
                              block_table, torch.full((batch,), kv_len, device=query.device,
                                                      dtype=torch.int32),
                              selection.chunk_ids, chunk, 0, window,
                              scale=kwargs.get("scaling"))
    return out[:, None], None


# policy name -> attention function.  Signature: transformers' attention interface,
#   query (B, H_q, q_len, D), key/value (B, H_kv, kv_len, D), attention_mask from sdpa_mask
#   (bool (B, 1, q_len, kv_len) or None), plus keyword ``policy``; returns ((B, q_len, H_q, D), None).
ATTENTION_BY_POLICY: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {
    "full": _full_attention,
    "shadowkv": _shadowkv_attention,
}


def register() -> None:
    """Make ``attn_implementation="kvplug"`` loadable; idempotent.

    The mask function must be registered too: transformers builds no attention
    mask (so ignores padding) for implementations it has no mask function for.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvplug_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _attention_for(policy: Policy) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    if policy.name not in ATTENTION_BY_POLICY and isinstance(policy, SelectionPolicy):
        return _selection_attention
    return ATTENTION_BY_POLICY[policy.name]


def _check_supported(policy: Policy) -> Policy:
    if policy.name not in ATTENTION_BY_POLICY and not isinstance(policy, SelectionPolicy):
        raise ValueError(f"kvplug policy {policy.name!r} is not supported by the HF transformers "
                         f"adapter; it runs {sorted(ATTENTION_BY_POLICY)} and every "
                         "decode-time selection policy")
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
    return _check_supported(resolve_config(environ=environ).build_policy())


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that call the attention interface with ``attn_implementation="kvplug"``."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx")
             and getattr(getattr(m, "config", None), "_attn_implementation", None) == ATTN_IMPLEMENTATION]
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
