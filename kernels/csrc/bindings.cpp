// The Python module of kvplug's CPU kernels (kernels/cpu_ext.py builds it).
#include "cpu_ext.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pages_decode", &pages_decode,
        "one decode query per sequence over its packed ZipCache pages (fused CPU read)");
  m.def("supports", &supports, "whether pages_decode reads (query heads per kv-head, "
        "head_dim, bits)");
  m.def("paged_queries", &paged_queries,
        "a few causal queries per sequence (speculative verification rows, or merged decode "
        "rows with a per-slot bias) over a float32 paged KV cache, each block's keys and "
        "values read once for all of them");
}
