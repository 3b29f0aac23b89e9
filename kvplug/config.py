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
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kvplug.policies import POLICIES, Policy, build_policy

DEFAULT_POLICY = "full"
# engine-level keys: (type, default, help)
ENGINE_KEYS: dict[str, tuple[type, Any, str]] = {
    "log_every_steps": (int, 200, "engine steps between 'live request states' log lines (0: never)"),
    "log_request_stats": (bool, True, "log each request's KV stats when it finishes"),
}


@dataclass(frozen=True)
class KVPlugConfig:
    policy: str = DEFAULT_POLICY
    params: Mapping[str, Any] = field(default_factory=dict)
    log_every_steps: int = ENGINE_KEYS["log_every_steps"][1]
    log_request_stats: bool = ENGINE_KEYS["log_request_stats"][1]
    sources: tuple[str, ...] = ()

    def build_policy(self) -> Policy:
        return build_policy(self.policy, dict(self.params))

    def describe(self) -> str:
        policy = self.build_policy()
        return (f"kvplug config: policy={self.policy} params={policy.params()} "
                f"log_every_steps={self.log_every_steps} "
                f"from {', '.join(self.sources) or 'defaults'}")


def _parse_config_env(text: str) -> dict[str, Any]:
    text = text.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"KVPLUG_CONFIG is not valid JSON ({e}): {text!r}") from None
        origin = "inline JSON"
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"KVPLUG_CONFIG={text!r} is neither inline JSON nor an existing file")
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        elif path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        else:
            raise ValueError(f"KVPLUG_CONFIG file {str(path)!r} must end in .json or .toml")
        origin = str(path)
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
    name = merged.pop("policy")
    if not isinstance(name, str) or name.lower() not in POLICIES:
        raise ValueError(f"unknown kvplug policy {name!r}; valid policies: {sorted(POLICIES)}")
    name = name.lower()
    engine: dict[str, Any] = {}
    for key, (tp, _, _) in ENGINE_KEYS.items():
        if key in merged:
            value = merged.pop(key)
            if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
                raise ValueError(f"kvplug config {key!r} must be {tp.__name__}, got {value!r}")
            if tp is int and value < 0:
                raise ValueError(f"kvplug config {key!r} must be >= 0, got {value!r}")
            engine[key] = value
    build_policy(name, merged)  # raises on unknown/mistyped/out-of-range parameters
    return KVPlugConfig(policy=name, params=merged, sources=sources, **engine)
