"""What the CPU and CUDA kvplug backends share: identity, the layer kinds
they accept, and binding batch rows to requests."""

from __future__ import annotations

import dataclasses

from kvplug.integrations.vllm.lifecycle import Step, tracker
from kvplug.integrations.vllm.selection import BACKEND_NAME


class KVPlugBackendMixin:
    """Put first in the bases of a backend that wraps one of vLLM's.

    ``get_name`` must be ``KVPLUG``: ``Attention.__init__`` looks the backend
    up again by that name.  Layer kinds kvplug does not run are refused here,
    so vLLM's ``validate_configuration`` names them instead of kvplug running
    them wrongly.
    """

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        from vllm.v1.attention.backend import AttentionType

        return attn_type == AttentionType.DECODER


def current_rows(num_reqs: int) -> Step | None:
    """The step's rows for a builder, or None outside a real step (dummy runs)."""
    t = tracker()
    step = None if t is None else t.current
    if step is not None and len(step.req_ids) != num_reqs:
        raise RuntimeError(f"kvplug: attention metadata has {num_reqs} rows but the step "
                           f"scheduled {len(step.req_ids)} requests {step.req_ids}")
    return step


def with_rows(metadata_cls, metadata, num_reqs: int):
    """Re-make vLLM's metadata as ``metadata_cls`` carrying the step's rows."""
    step = current_rows(num_reqs)
    fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)
              if f.init}
    return metadata_cls(**fields, rows=step)
