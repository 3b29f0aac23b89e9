"""Policy base class, the policy registry and per-request accounting.

A policy is a small typed dataclass registered by name.  Its fields are its
parameters: their annotations give the type, their defaults the default, and
``field(metadata=...)`` gives the help line and the valid range.  Both engine
adapters (vLLM and HF transformers) build a policy from a validated config and
ask it the same questions, so a policy knows no engine.

Lifecycle, per request: ``new_request_state()`` when the request is first
seen in a batch (its first prefill), ``account_step()`` once per engine step
while it is scheduled, and the state is dropped at finish, abort or
preemption.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

POLICIES: dict[str, type["Policy"]] = {}
# the largest integer a parameter may hold: tensors index and count in int64
MAX_INT = 2**63 - 1


def register_policy(name: str):
    """Class decorator: make ``cls`` selectable as ``policy=name``."""

    def wrap(cls: type[Policy]) -> type[Policy]:
        if name in POLICIES:
            raise ValueError(f"policy {name!r} is registered twice")
        cls.name = name
        POLICIES[name] = cls
        return cls

    return wrap


def param(default: Any, help: str, *, min: float | None = None,
          max: float | None = None, choices: tuple | None = None):
    """A policy parameter: a dataclass field carrying its help line and range."""
    return field(default=default, metadata={"help": help, "min": min, "max": max,
                                            "choices": choices})


@dataclass
class RequestStats:
    """What one request cost in KV terms; logged at finish and summed by bench."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0          # tokens computed at prefill (prefix-cache hits excluded)
    decode_steps: int = 0
    kv_tokens_read: int = 0          # summed over decode steps, per sequence (not per layer)
    kv_tokens_stored: int = 0        # KV tokens the policy keeps at the last step

    def as_dict(self) -> dict[str, float]:
        d = dataclasses.asdict(self)
        steps = max(self.decode_steps, 1)
        d["kv_tokens_read_per_step"] = round(self.kv_tokens_read / steps, 1)
        return d


@dataclass
class RequestState:
    """Per-request state a policy keeps between engine steps."""

    stats: RequestStats = field(default_factory=RequestStats)


@dataclass
class Policy:
    """Base of every kvplug policy.

    Subclasses set ``summary`` (one line: what the policy saves) and declare
    their parameters as dataclass fields made with :func:`param`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # what the policy needs an engine to do (docs/design.md, "The policy contract"):
    # stages it acts in ("select": decode-time reads; "prefill_compress": keep less at the
    # end of prefill; "decode_compress": keep less again as decode adds tokens;
    # "layer_budgets": keep a different number of tokens per layer) and the
    # format its KV is stored in ("dense", "evicted", "merged": centroids with counts,
    # "lowrank": low-rank keys and offloaded values), and the store it runs with where an
    # engine keeps no store of that kind (None: it runs nowhere else)
    stages: ClassVar[frozenset[str]] = frozenset()
    store: ClassVar[str] = "dense"
    fallback_store: ClassVar[str | None] = None
    # whether a compressing policy's kv-heads may keep different numbers of tokens in a
    # layer (an engine pads the heads that keep fewer with slots of count 0, or stores
    # each head's slots in cells of its own)
    uneven_heads: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_param(self.name, f, getattr(self, f.name))

    # -- lifecycle -----------------------------------------------------------
    def new_request_state(self, prompt_tokens: int) -> RequestState:
        return RequestState(stats=RequestStats(prompt_tokens=prompt_tokens))

    def kv_tokens_read(self, context_len: int) -> int:
        """KV tokens one decode step reads per sequence (per layer) at ``context_len``."""
        return context_len

    def kv_tokens_kept(self, context_len: int) -> int:
        """KV tokens the policy keeps stored for a sequence of ``context_len``."""
        return context_len

    def account_step(self, state: RequestState, computed_before: int,
                     new_tokens: int, is_prefill: bool) -> None:
        """Record one scheduled step of a request (computed_before + new_tokens = context)."""
        context = computed_before + new_tokens
        if is_prefill:
            state.stats.prefill_tokens += new_tokens
        else:
            state.stats.decode_steps += 1
            state.stats.kv_tokens_read += self.kv_tokens_read(context)
        state.stats.kv_tokens_stored = self.kv_tokens_kept(context)

    def check_model(self, num_layers: int, num_kv_heads: int, unit: int) -> None:
        """Bind the policy to a model and an engine read unit (tokens); ValueError if it
        cannot run there.  Engines call it once per process, before any forward."""

    @classmethod
    def check_engine(cls, engine: str, stages: frozenset[str], stores: frozenset[str]) -> None:
        """Refuse an engine that lacks a stage or the store this policy needs (adapters
        call it at engine start, so an unsupported pair never runs dense in silence)."""
        missing = sorted(cls.stages - stages)
        if cls.store_on(stores) is None:
            missing.append(f"store {cls.store!r}")
        if missing:
            raise ValueError(f"kvplug policy {cls.name!r} needs {', '.join(missing)}, which "
                             f"{engine} does not support (it supports stages {sorted(stages)} "
                             f"and stores {sorted(stores)})")

    @classmethod
    def store_on(cls, stores: frozenset[str]) -> str | None:
        """The store this policy keeps on an engine that keeps ``stores``; None: none."""
        for store in (cls.store, cls.fallback_store):
            if store in stores:
                return store
        return None

    # -- description ---------------------------------------------------------
    @classmethod
    def parameters(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _type_name(tp: Any) -> str:
    return tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))


def check_param(policy: str, f: dataclasses.Field, value: Any) -> None:
    """Raise ValueError naming the bad value and the valid choices."""
    tp = _type_name(f.type)
    ok_types = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
    expected = ok_types.get(tp)
    if expected is not None:
        if isinstance(value, bool) and tp != "bool" or not isinstance(value, expected):
            raise ValueError(f"policy {policy!r}: parameter {f.name!r} must be {tp}, "
                             f"got {value!r} ({type(value).__name__})")
        # NaN compares false with every bound, and JSON/TOML read NaN and Infinity
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"policy {policy!r}: parameter {f.name!r} must be a finite "
                             f"number, got {value!r}")
        if isinstance(value, int) and not -MAX_INT <= value <= MAX_INT:
            raise ValueError(f"policy {policy!r}: parameter {f.name!r}={value} does not fit "
                             f"in 64 bits")
    meta = f.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ValueError(f"policy {policy!r}: parameter {f.name!r}={value!r} is not one of "
                         f"{list(meta['choices'])}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"policy {policy!r}: parameter {f.name!r}={value!r} is out of range "
                         f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")


def build_policy(name: str, params: dict[str, Any] | None = None) -> Policy:
    """Instantiate a registered policy, rejecting unknown names and parameters."""
    if name not in POLICIES:
        raise ValueError(f"unknown kvplug policy {name!r}; valid policies: {sorted(POLICIES)}")
    cls = POLICIES[name]
    params = dict(params or {})
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(map(repr, set(params) - set(valid)))
    if unknown:
        raise ValueError(f"policy {name!r} has no parameter {', '.join(unknown)}; "
                         f"valid parameters: {valid if valid else 'none'}")
    return cls(**params)
