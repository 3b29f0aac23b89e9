"""Where kvplug's configuration comes from, and its validation.

Sources, later ones override earlier ones key by key:

1. defaults: policy ``full``;
2. ``KVPLUG_CONFIG``: inline JSON (``'{"policy": "full"}'``) or a path to a
   ``.json`` / ``.toml`` file;
3. ``KVPLUG_POLICY``: the policy name alone;
4. vLLM's ``--additional-config '{"kvplug": {...}}'`` (part of vLLM's config
   hash, so it is the one to use when configs must be told apart).

A config is a flat mapping: ``policy``, the engine-level keys in
:data:`ENGINE_KEYS`, and the chosen policy's parameters.  It is validated once
at engine start; anything unknown, mistyped or out of range is an error that
names the bad value and the valid choices.

``switch_to`` lists further policy configs (``{"policy": ..., params}``) the
engine may be switched to while idle
(:func:`kvplug.integrations.vllm.set_policy`): their key summaries are kept
from the start, so one engine and its prefix cache serve several policies
(``kvplug eval`` compares policies on one prefill this way).

``store`` is a store policy (``{"policy": "zipcache", ...}``: one that declares no
stage, only how the KV is kept) under a selection policy: the engine keeps the KV
the store's way and decodes through the selection (e.g. Quest's pages over a 4/2-bit
pool).

``draft`` is the selection policy (``{"policy": ..., params}``) the model reads
through when it drafts tokens for itself (self-speculation, vLLM's
``--speculative-config`` naming kvplug's drafter); the policy it verifies with
must read every token, so the output is the dense model's.  ``first_tier``
(``{"method": "ngram", "num_tokens": k, "min_n": .., "max_n": ..}``) puts a cheaper
proposer under that draft, as TriForce's hierarchy does: prompt-lookup n-grams the
draft checks k at a time in one forward, keeping the prefix it agrees with.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from kvplug.policies import POLICIES, Policy, build_policy
from kvplug.policies.base import MAX_INT

DEFAULT_POLICY = "full"
# engine-level keys: (type, default, help)
ENGINE_KEYS: dict[str, tuple[type, Any, str]] = {
    "log_every_steps": (int, 200, "engine steps between 'live request states' log lines (0: never)"),
    "log_request_stats": (bool, True, "log each request's KV stats when it finishes"),
    "switch_to": (list, [], "policy configs ({\"policy\": ..., params}) the engine may be "
                            "switched to while idle; their key summaries are kept from the start"),
    "draft": (dict, None, "selection policy config ({\"policy\": ..., params}) the model reads "
                          "through when it drafts for itself (self-speculation)"),
    "first_tier": (dict, None, "proposer ({\"method\": \"ngram\", \"num_tokens\": k, "
                               "\"min_n\": .., \"max_n\": ..}) whose tokens the draft checks "
                               "k at a time (TriForce's hierarchy; needs 'draft')"),
    "store": (dict, None, "store policy config ({\"policy\": \"zipcache\", ...}) the KV is kept "
                          "in under the selection policy"),
    "layer_groups": (bool, True, "vLLM: where every policy evicts by per-layer budgets (CAKE), "
                                 "keep each layer in a KV-cache group of its own, so each "
                                 "layer frees its own blocks (false: one group, every layer "
                                 "holds the largest layer budget)"),
}


@dataclass(frozen=True)
class PolicyConfig:
    """A policy name with its parameters, validated."""

    policy: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def build_policy(self) -> Policy:
        return build_policy(self.policy, dict(self.params))

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, **self.params}

    @classmethod
    def parse(cls, data: Any, where: str) -> "PolicyConfig":
        """``{"policy": name, **params}`` -> PolicyConfig; ValueError naming ``where``."""
        if not isinstance(data, Mapping) or "policy" not in data:
            raise ValueError(f"{where} must be an object with a 'policy' key, got {data!r}")
        params = dict(data)
        name = params.pop("policy")
        if not isinstance(name, str) or name.lower() not in POLICIES:
            raise ValueError(f"{where} 'policy': unknown kvplug policy {name!r}; valid policies: "
                             f"{sorted(POLICIES)}")
        try:  # raises on unknown/mistyped/out-of-range/non-finite params
            build_policy(name.lower(), params)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return cls(name.lower(), params)


@dataclass(frozen=True)
class FirstTierConfig:
    """The proposer under the draft policy: prompt lookup (vLLM's n-gram matcher over the
    request's tokens and drafts), ``num_tokens`` tokens checked per draft forward, after
    the longest earlier match of the last ``max_n`` down to ``min_n`` tokens.  vLLM's own
    n-gram speculation matches 5 tokens because a wrong guess costs a dense verification
    row; here it costs a few extra sparse query rows, so shorter matches pay."""

    method: str = "ngram"
    num_tokens: int = 3
    min_n: int = 2
    max_n: int = 5

    METHODS = ("ngram",)

    @classmethod
    def parse(cls, data: Any) -> "FirstTierConfig":
        where = "kvplug config first_tier"
        fields_ = {f.name: f.default for f in fields(cls)}
        unknown = sorted(set(data) - set(fields_))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; valid keys: {sorted(fields_)}")
        values = {**fields_, **data}
        if values["method"] not in cls.METHODS:
            raise ValueError(f"{where} 'method': {values['method']!r} is not one of "
                             f"{list(cls.METHODS)}")
        for key in ("num_tokens", "min_n", "max_n"):
            value = values[key]
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 64:
                raise ValueError(f"{where} {key!r} must be an int in [1, 64], got {value!r}")
        if values["min_n"] > values["max_n"]:
            raise ValueError(f"{where}: min_n {values['min_n']} exceeds max_n {values['max_n']}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KVPlugConfig(PolicyConfig):
    log_every_steps: int = ENGINE_KEYS["log_every_steps"][1]
    log_request_stats: bool = ENGINE_KEYS["log_request_stats"][1]
    switch_to: tuple[PolicyConfig, ...] = ()
    draft: PolicyConfig | None = None
    first_tier: FirstTierConfig | None = None
    store: PolicyConfig | None = None
    layer_groups: bool = ENGINE_KEYS["layer_groups"][1]
    sources: tuple[str, ...] = ()

    def policy_configs(self) -> tuple[PolicyConfig, ...]:
        """The starting policy, then every one the engine may switch to."""
        return (PolicyConfig(self.policy, self.params), *self.switch_to)

    def describe(self) -> str:
        policy = self.build_policy()
        switch = ""
        if self.switch_to:
            switch = " switch_to=" + json.dumps([c.as_dict() for c in self.switch_to])
        if self.draft is not None:
            switch += " draft=" + json.dumps(self.draft.as_dict())
        if self.first_tier is not None:
            switch += " first_tier=" + json.dumps(self.first_tier.as_dict())
        if self.store is not None:
            switch += " store=" + json.dumps(self.store.as_dict())
        if not self.layer_groups:
            switch += " layer_groups=false"
        return (f"kvplug config: policy={self.policy} params={policy.params()} "
                f"log_every_steps={self.log_every_steps}{switch} "
                f"from {', '.join(self.sources) or 'defaults'}")


def _load(text: str, loads, what: str, origin: str) -> Any:
    """Parse ``text``; any syntax error, over-deep nesting or over-long number is a ValueError."""
    try:
        return loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, TOMLDecodeError: ValueErrors
        shown = text if len(text) <= 200 else text[:200] + "..."
        raise ValueError(f"KVPLUG_CONFIG ({origin}) is not valid {what} "
                         f"({type(e).__name__}: {str(e)[:200]}): {shown!r}") from None


def _parse_config_env(text: str) -> dict[str, Any]:
    text = text.strip()
    if text.startswith("{"):
        origin = "inline JSON"
        data = _load(text, json.loads, "JSON", origin)
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"KVPLUG_CONFIG={text!r} is neither inline JSON nor an existing file")
        origin = str(path)
        if path.suffix not in (".json", ".toml"):
            raise ValueError(f"KVPLUG_CONFIG file {origin!r} must end in .json or .toml")
        try:
            body = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"KVPLUG_CONFIG file {origin!r} cannot be read as text: {e}") from None
        if path.suffix == ".json":
            data = _load(body, json.loads, "JSON", origin)
        else:
            data = _load(body, tomllib.loads, "TOML", origin)
    if not isinstance(data, dict):
        raise ValueError(f"KVPLUG_CONFIG ({origin}) must hold an object, got {type(data).__name__}")
    return data


def resolve_config(additional_config: Mapping[str, Any] | None = None,
                   environ: Mapping[str, str] | None = None) -> KVPlugConfig:
    """Merge the sources (see module docstring) and validate the result."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {"policy": DEFAULT_POLICY}
    sources: list[str] = []
    if environ.get("KVPLUG_CONFIG"):
        merged.update(_parse_config_env(environ["KVPLUG_CONFIG"]))
        sources.append("KVPLUG_CONFIG")
    if environ.get("KVPLUG_POLICY"):
        merged["policy"] = environ["KVPLUG_POLICY"]
        sources.append("KVPLUG_POLICY")
    extra = (additional_config or {}).get("kvplug")
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise ValueError("--additional-config 'kvplug' must be an object, "
                             f"got {type(extra).__name__}: {extra!r}")
        merged.update(extra)
        sources.append("--additional-config")
    return _validate(merged, tuple(sources))


def _validate(merged: dict[str, Any], sources: tuple[str, ...]) -> KVPlugConfig:
    engine: dict[str, Any] = {}
    for key, (tp, _, _) in ENGINE_KEYS.items():
        if key in merged:
            value = merged.pop(key)
            if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
                raise ValueError(f"kvplug config {key!r} must be {tp.__name__}, got {value!r}")
            if tp is int and not 0 <= value <= MAX_INT:
                raise ValueError(f"kvplug config {key!r} must be in [0, {MAX_INT}], got {value!r}")
            engine[key] = value
    if "switch_to" in engine:
        engine["switch_to"] = tuple(PolicyConfig.parse(c, f"kvplug config 'switch_to'[{i}]")
                                    for i, c in enumerate(engine["switch_to"]))
    first = PolicyConfig.parse(merged, "kvplug config")
    if "draft" in engine:
        engine["draft"] = _draft_config(engine["draft"], first, engine.get("switch_to", ()))
    if "first_tier" in engine:
        if engine.get("draft") is None:
            raise ValueError("kvplug config first_tier proposes tokens for the draft policy: "
                             "set 'draft' too (e.g. {\"policy\": \"streamingllm\", "
                             "\"budget\": 512})")
        engine["first_tier"] = FirstTierConfig.parse(engine["first_tier"])
    if "store" in engine:
        engine["store"] = _store_config(engine["store"], first, engine)
    return KVPlugConfig(policy=first.policy, params=first.params, sources=sources, **engine)


def _draft_config(data: Any, target: PolicyConfig,
                  switch_to: tuple[PolicyConfig, ...]) -> PolicyConfig:
    """The draft policy: a selection policy, drafting for a target that reads every token
    (verification must be the dense model for the output to be lossless)."""
    draft = PolicyConfig.parse(data, "kvplug config draft")
    stages = draft.build_policy().stages
    if stages != {"select"}:
        raise ValueError(f"kvplug config draft: policy {draft.policy!r} has stages "
                         f"{sorted(stages)}; a draft policy must only select what a decode "
                         f"step reads (stages ['select'])")
    if target.build_policy().stages:
        raise ValueError(f"kvplug config draft: the verifying policy {target.policy!r} must "
                         f"read every token (e.g. 'full') for drafts to be verified densely")
    if switch_to:
        raise ValueError("kvplug config draft cannot be combined with switch_to")
    return draft


def _store_config(data: Any, reader: PolicyConfig, engine: dict[str, Any]) -> PolicyConfig:
    """The store policy under ``reader``: it declares no stage and keeps a store of its
    own; the reader only selects what decode reads and keeps the dense store."""
    store = PolicyConfig.parse(data, "kvplug config store")
    policy = store.build_policy()
    if policy.stages or policy.store == "dense":
        raise ValueError(f"kvplug config store: policy {store.policy!r} (stages "
                         f"{sorted(policy.stages)}, store {policy.store!r}) is not a store "
                         "policy: one with no stage and a store of its own, e.g. 'zipcache'")
    read = reader.build_policy()
    if read.stages != {"select"} or read.store != "dense":
        raise ValueError(f"kvplug config store: the policy over it, {reader.policy!r} (stages "
                         f"{sorted(read.stages)}, store {read.store!r}), must only select "
                         "what decode reads (stages ['select'], store 'dense')")
    if engine.get("switch_to") or engine.get("draft") is not None:
        raise ValueError("kvplug config store cannot be combined with switch_to or draft")
    return store
