"""kvplug policies: one small dataclass per method, selectable by name."""

from kvplug.policies.base import (POLICIES, Policy, RequestState, RequestStats, build_policy,
                                  param, register_policy)
from kvplug.policies.full import Full
from kvplug.policies.selection import Quest, Selection, SelectionPolicy, StreamingLLM

__all__ = ["POLICIES", "Policy", "RequestState", "RequestStats", "build_policy", "param",
           "register_policy", "Full", "Quest", "Selection", "SelectionPolicy", "StreamingLLM"]
