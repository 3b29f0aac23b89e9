// The CPU path of kvplug.kernels.quant_pages.pages_attention: one decode query per
// sequence over its packed pages, fused (a token's codes unpacked into a D-float buffer,
// online softmax per page, the query heads of a kv-head together), so a step reads each
// page's bytes once and writes no full-precision copy of the past.  Same contract and page layout as the
// Triton kernel and the torch reference beside it (quant_pages.py, PageLayout).
#include "cpu_ext.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// A token's codes as floats: channel i*F + j sits in byte j at shift i*bits (pack_codes'
// planes).
inline void unpack_token(const uint8_t* bytes, int64_t F, int bits, float* codes) {
  const uint8_t mask = (1u << bits) - 1;
  for (int i = 0; i < 8 / bits; ++i) {
    const int shift = i * bits;
#pragma omp simd
    for (int64_t j = 0; j < F; ++j)
      codes[i * F + j] = static_cast<float>((bytes[j] >> shift) & mask);
  }
}

inline void halves_to_float(const uint8_t* at, int64_t n, float* out) {
  const c10::Half* h = reinterpret_cast<const c10::Half*>(at);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(h[i]);
}


// A page's fields (PageLayout.fields), as byte offsets.
struct Layout {
  int64_t T, D, F, bits;
  int64_t v_codes() const { return T * F; }
  int64_t v_zero() const { return 2 * T * F; }
  int64_t v_step() const { return v_zero() + 2 * T; }
  int64_t groups() const { return v_step() + 2 * T; }
  int64_t k_zero() const { return groups() + T; }
  int64_t k_step() const { return k_zero() + 4 * D; }
  int64_t v_scale() const { return k_step() + 4 * D; }
  int64_t used() const { return v_scale() + 4 * D; }
};

// Per-thread buffers of one (sequence, kv-head) read.
struct Scratch {
  std::vector<float> kz, ks, vs, vz, vt, codes, qs, qz, scores, acc, part, bias, m, l, alpha;
  Scratch(const Layout& L, int64_t G)
      : kz(2 * L.D), ks(2 * L.D), vs(2 * L.D), vz(L.T), vt(L.T), codes(L.D),
        qs(G * 2 * L.D), qz(G * 2),
        scores(G * L.T), acc(G * L.D), part(G * 2 * L.D), bias(G * 2), m(G), l(G), alpha(G) {}
};

// The G query heads of one kv-head (q: [G, D], times the softmax scale) over `num_pages`
// pages; writes out [G, D] and lse [G] (left as they are when there are no pages).
template <int G>
void read_pages(const Layout& L, const float* q, const uint8_t* const* pages,
                int64_t num_pages, Scratch& S, float* out, float* lse) {
  const int64_t T = L.T, D = L.D, F = L.F, chunks = D / kLanes;
  const int bits = static_cast<int>(L.bits);
  std::fill(S.acc.begin(), S.acc.end(), 0.f);
  std::fill(S.m.begin(), S.m.end(), kNoScore);
  std::fill(S.l.begin(), S.l.end(), 0.f);
  for (int64_t i = 0; i < num_pages; ++i) {
    const uint8_t* page = pages[i];
    const uint8_t* group = page + L.groups();
    halves_to_float(page + L.k_zero(), 2 * D, S.kz.data());
    halves_to_float(page + L.k_step(), 2 * D, S.ks.data());
    halves_to_float(page + L.v_scale(), 2 * D, S.vs.data());
    halves_to_float(page + L.v_zero(), T, S.vz.data());
    halves_to_float(page + L.v_step(), T, S.vt.data());
    // q · (code * step_grp + zero_grp) = (q * step_grp) · code + q · zero_grp; row (g, grp)
    // of qs at (grp·G + g)·D
    for (int grp = 0; grp < 2; ++grp)
      for (int g = 0; g < G; ++g) {
        float* row = &S.qs[(grp * G + g) * D];
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          row[d] = q[g * D + d] * S.ks[grp * D + d];
          dot += q[g * D + d] * S.kz[grp * D + d];
        }
        S.qz[grp * G + g] = dot;
      }
    for (int64_t t = 0; t < T; ++t) {
      const uint8_t* token = page + t * F;
      const int grp = group[t] != 0;
      const float* rows = &S.qs[grp * G * D];
      unpack_token(token, F, bits, S.codes.data());
      v8f dots[G] = {};
      for (int64_t c = 0; c < chunks; ++c) {
        const v8f code = load8(&S.codes[c * kLanes]);
        for (int g = 0; g < G; ++g) dots[g] += load8(rows + g * D + c * kLanes) * code;
      }
      for (int g = 0; g < G; ++g) S.scores[g * T + t] = sum8(dots[g]) + S.qz[grp * G + g];
    }
    for (int g = 0; g < G; ++g) {  // online softmax, one page at a time
      float* s = &S.scores[g * T];
      float top = S.m[g];
      for (int64_t t = 0; t < T; ++t) top = std::max(top, s[t]);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < T; ++t) {
        s[t] = std::exp(s[t] - top);
        sum += s[t];
      }
      S.alpha[g] = std::exp(S.m[g] - top);  // 0 on the first page (m = kNoScore)
      S.l[g] = S.l[g] * S.alpha[g] + sum;
      S.m[g] = top;
    }
    // sum_t p_t (code_t * step_t + zero_t) per group, times the group's channel scale
    std::fill(S.part.begin(), S.part.end(), 0.f);
    std::fill(S.bias.begin(), S.bias.end(), 0.f);
    for (int64_t t = 0; t < T; ++t) {
      const uint8_t* token = page + L.v_codes() + t * F;
      const int grp = group[t] != 0;
      float* rows = &S.part[grp * G * D];
      float w[G];
      for (int g = 0; g < G; ++g) {
        const float p = S.scores[g * T + t];
        w[g] = p * S.vt[t];
        S.bias[grp * G + g] += p * S.vz[t];
      }
      unpack_token(token, F, bits, S.codes.data());
      for (int64_t c = 0; c < chunks; ++c) {
        const v8f code = load8(&S.codes[c * kLanes]);
        for (int g = 0; g < G; ++g) {
          float* row = rows + g * D + c * kLanes;
          store8(row, load8(row) + w[g] * code);
        }
      }
    }
    for (int g = 0; g < G; ++g) {
      float* a = &S.acc[g * D];
      const float* p0 = &S.part[g * D];
      const float* p1 = &S.part[(G + g) * D];
      const float b0 = S.bias[g], b1 = S.bias[G + g];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d)
        a[d] = a[d] * S.alpha[g] + (p0[d] + b0) * S.vs[d] + (p1[d] + b1) * S.vs[D + d];
    }
  }
  for (int g = 0; g < G; ++g) {
    if (S.l[g] <= 0.f) continue;
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = S.acc[g * D + d] / S.l[g];
    lse[g] = S.m[g] + std::log(S.l[g]);
  }
}

using ReadPages = void (*)(const Layout&, const float*, const uint8_t* const*, int64_t, Scratch&,
                           float*, float*);

// Query heads per kv-head of common GQA models; another count is refused by name.
ReadPages read_pages_for(int64_t G) {
  switch (G) {
    case 1: return read_pages<1>;
    case 2: return read_pages<2>;
    case 3: return read_pages<3>;
    case 4: return read_pages<4>;
    case 5: return read_pages<5>;
    case 6: return read_pages<6>;
    case 7: return read_pages<7>;
    case 8: return read_pages<8>;
    case 16: return read_pages<16>;
    default: return nullptr;
  }
}

}  // namespace

// Whether pages_decode reads this shape (else it refuses it).
bool supports(int64_t group, int64_t head_dim, int64_t bits) {
  return read_pages_for(group) != nullptr && (bits == 2 || bits == 4 || bits == 8) &&
         head_dim % kLanes == 0 && (head_dim * bits / 8) % kLanes == 0;
}

// query [R, H_q, D] float32 (already times the softmax scale); pages: one layer's pool
// [num_blocks, H_kv, page_bytes] uint8; table [R, >= max(num_pages)] int64; num_pages [R]
// int64.  Returns out [R, H_q, D] float32 and lse [R, H_q] (natural log; -inf and 0 out
// where a sequence has no pages).
std::vector<torch::Tensor> pages_decode(torch::Tensor query, torch::Tensor pages,
                                        torch::Tensor table, torch::Tensor num_pages,
                                        int64_t block_size, int64_t bits) {
  TORCH_CHECK(query.dim() == 3 && query.scalar_type() == torch::kFloat && query.is_contiguous(),
              "query: contiguous float32 [R, H_q, D] expected");
  TORCH_CHECK(pages.dim() == 3 && pages.scalar_type() == torch::kUInt8 && pages.stride(2) == 1,
              "pages: uint8 [num_blocks, H_kv, page_bytes] with contiguous pages expected");
  TORCH_CHECK(table.scalar_type() == torch::kLong && num_pages.scalar_type() == torch::kLong,
              "table and num_pages: int64 expected");
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be 2, 4 or 8, got ", bits);
  const int64_t R = query.size(0), H_q = query.size(1), D = query.size(2);
  const int64_t H_kv = pages.size(1);
  const Layout L{block_size, D, D * bits / 8, bits};
  TORCH_CHECK(H_q % H_kv == 0, "H_q ", H_q, " is not a multiple of H_kv ", H_kv);
  const int64_t G = H_q / H_kv;
  const ReadPages read = read_pages_for(G);
  TORCH_CHECK(read != nullptr, G, " query heads per kv-head: the CPU page read handles 1-8 "
              "and 16");
  TORCH_CHECK(D % kLanes == 0 && L.F % kLanes == 0, "head_dim ", D, " at ", bits,
              " bits: its codes must fill whole 8-byte words (head_dim·bits/8 % 8 == 0)");
  TORCH_CHECK(pages.size(2) >= L.used(), "pages of ", pages.size(2),
              " bytes are smaller than the layout's ", L.used());

  auto out = torch::zeros({R, H_q, D}, query.options());
  auto lse = torch::full({R, H_q}, -std::numeric_limits<float>::infinity(), query.options());
  auto table_c = table.contiguous();
  auto counts = num_pages.contiguous();
  const float* q_all = query.data_ptr<float>();
  const uint8_t* pool = pages.data_ptr<uint8_t>();
  const int64_t* tab = table_c.data_ptr<int64_t>();
  const int64_t tab_stride = table_c.size(1);
  const int64_t* n_pages = counts.data_ptr<int64_t>();
  float* out_all = out.data_ptr<float>();
  float* lse_all = lse.data_ptr<float>();
  const int64_t s_block = pages.stride(0), s_head = pages.stride(1);

  at::parallel_for(0, R * H_kv, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(L, G);
    std::vector<const uint8_t*> row_pages;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t r = idx / H_kv, h = idx % H_kv;
      row_pages.resize(n_pages[r]);
      for (int64_t i = 0; i < n_pages[r]; ++i)
        row_pages[i] = pool + tab[r * tab_stride + i] * s_block + h * s_head;
      read(L, q_all + (r * H_q + h * G) * D, row_pages.data(), n_pages[r], scratch,
           out_all + (r * H_q + h * G) * D, lse_all + r * H_q + h * G);
    }
  });
  return {out, lse};
}
