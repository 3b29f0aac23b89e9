"""kvplug policies: one small dataclass per method, selectable by name."""

from kvplug.policies.base import (POLICIES, Policy, RequestState, RequestStats, build_policy,
                                  param, register_policy)
from kvplug.policies.full import Full

__all__ = ["POLICIES", "Policy", "RequestState", "RequestStats", "build_policy", "param",
           "register_policy", "Full"]
