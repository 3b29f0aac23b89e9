"""kvplug on vLLM for CUDA: a subclass of vLLM's Triton attention backend.

Not exercised on a GPU in this repository's CI (there is none); the tests
import it and run vLLM's ``validate_configuration`` against Llama-style
layer settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.attention.backends.triton_attn import (TritonAttentionBackend,
                                                    TritonAttentionMetadata,
                                                    TritonAttentionMetadataBuilder)

from kvplug.integrations.vllm.common import KVPlugBackendMixin, Step, with_rows


@dataclass
class KVPlugCudaMetadata(TritonAttentionMetadata):
    rows: Step | None = None


class KVPlugCudaMetadataBuilder(TritonAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return with_rows(KVPlugCudaMetadata, metadata, common_attn_metadata.num_reqs)


class KVPlugCudaBackend(KVPlugBackendMixin, TritonAttentionBackend):
    @staticmethod
    def get_builder_cls():
        return KVPlugCudaMetadataBuilder
