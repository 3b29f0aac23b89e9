// kvplug's C++ CPU kernels (one extension, kernels/cpu_ext.py): their entry points and
// the SIMD helpers they share.
#pragma once

#include <torch/extension.h>

#include <cstring>
#include <optional>
#include <vector>

// Built with -ffast-math (vectorized expf and reductions), which assumes no infinities:
// a running max starts at a finite floor, and "nothing read" is told by l == 0.
constexpr float kNoScore = -1e30f;

// 8 lanes of float (GCC/Clang vector extensions: AVX2 registers with -march=native).
typedef float v8f __attribute__((vector_size(32)));
constexpr int kLanes = 8;

inline v8f load8(const float* p) {
  v8f x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

inline void store8(float* p, v8f x) { std::memcpy(p, &x, sizeof x); }

inline float sum8(v8f x) {
  return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

// quant_pages_cpu.cpp
bool supports(int64_t group, int64_t head_dim, int64_t bits);
std::vector<torch::Tensor> pages_decode(torch::Tensor query, torch::Tensor pages,
                                        torch::Tensor table, torch::Tensor num_pages,
                                        int64_t block_size, int64_t bits);

// paged_queries_cpu.cpp
void paged_queries(torch::Tensor query, torch::Tensor kv_cache, torch::Tensor query_start_loc,
                   torch::Tensor seq_lens, torch::Tensor block_table, double scale,
                   torch::Tensor out, std::optional<torch::Tensor> slot_bias);
