"""``full``: dense attention, every KV token kept and read.

The baseline every other policy is measured against: the engine adapters run
the engine's own dense kernels unchanged, so outputs are token-identical to
the engine's default backend.
"""

from dataclasses import dataclass

from kvplug.policies.base import Policy, register_policy


@register_policy("full")
@dataclass
class Full(Policy):
    summary = "dense passthrough: saves nothing; the exact baseline"
