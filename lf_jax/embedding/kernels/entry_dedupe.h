// The sparse update's dedupe of a group's entries per piece (included by sparse_step.cc;
// build.py keys the cached library by this header too). One Dedupe per concurrent call
// (a Lease, scratch.h): its vectors grow to the largest call and are reused.
#ifndef LF_JAX_KERNELS_ENTRY_DEDUPE_H_
#define LF_JAX_KERNELS_ENTRY_DEDUPE_H_

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace lf_jax_kernels {

// The entries of a group, deduplicated per piece. Collect reads the [N, E] entries once
// in memory order and appends each valid one to its piece's segment of keys
// (row << 32 | entry; piece p's segment starts at p * N * W), with its gradient row
// src[k] and coefficient coef[k]. Sort(p) runs a stable LSD radix sort of the segment on
// the row bits (digits of at most 11 bits; a piece's keys fit the caches): distinct row
// u is row[u], ascending, and its entries are the low halves of keys[start[u] ..
// start[u + 1]), in entry order. (An open-addressing hash instead spent a third of the
// update in its probes' cache misses, and reading the entries piece by piece, strided,
// half of the dedupe.)
struct Dedupe {
  std::vector<uint64_t> keys, spare;
  std::vector<int32_t> row, start, src, count, piece_of, end;
  std::vector<float> coef;
  int64_t distinct = 0;

  void Collect(const int32_t* rows, const float* coef_ne, const int32_t* out_col,
               const int32_t* piece_cols, int64_t P, int64_t W, int64_t N, int64_t E,
               int64_t C, int64_t R) {
    const int64_t most = N * W, total = P * most;
    Reserve(total);
    piece_of.assign(E, -1);
    for (int64_t i = 0; i < P * W; ++i) {
      if (piece_cols[i] >= 0) piece_of[piece_cols[i]] = int32_t(i / W);
    }
    end.resize(P);
    for (int64_t p = 0; p < P; ++p) end[p] = int32_t(p * most);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t e = 0; e < E; ++e) {
        const int32_t r = rows[n * E + e], p = piece_of[e];
        if (r < 0 || r >= R || p < 0) continue;
        const int32_t k = end[p]++;
        keys[k] = uint64_t(r) << 32 | uint64_t(k);
        src[k] = int32_t(n * C + out_col[e]);
        coef[k] = coef_ne[n * E + e];
      }
    }
  }

  // The entries an owner received in bag mode, all in piece 0 (then Sort(0, S * X, 1, R)):
  // sender s's entry i (rows, dst, coef [S, X]) has gradient row s * Cb + dst[s, i];
  // entries with a row outside [0, R) or dst outside [0, Cb) are skipped.
  void CollectBag(const int32_t* rows, const int32_t* dst, const float* coef_sx, int64_t S,
                  int64_t X, int64_t Cb, int64_t R) {
    Reserve(S * X);
    end.assign(1, 0);
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t i = s * X; i < (s + 1) * X; ++i) {
        const int32_t r = rows[i], j = dst[i];
        if (r < 0 || r >= R || j < 0 || j >= Cb) continue;
        const int32_t k = end[0]++;
        keys[k] = uint64_t(r) << 32 | uint64_t(k);
        src[k] = int32_t(s * Cb + j);
        coef[k] = coef_sx[i];
      }
    }
  }

  void Reserve(int64_t total) {
    if (int64_t(keys.size()) < total) {
      for (auto* v : {&keys, &spare}) v->resize(total);
      for (auto* v : {&src, &row, &start}) v->resize(total + 1);
      coef.resize(total);
    }
  }

  void Sort(int64_t p, int64_t N, int64_t W, int64_t R) {
    uint64_t* a = keys.data() + p * N * W;
    uint64_t* b = spare.data() + p * N * W;
    const int64_t m = end[p] - p * N * W;
    int bits = 1;
    while ((int64_t(1) << bits) < R) ++bits;
    const int passes = (bits + 10) / 11, digit = (bits + passes - 1) / passes;
    count.resize(size_t(1) << digit);
    const uint64_t mask = (uint64_t(1) << digit) - 1;
    for (int shift = 32; shift < 32 + bits; shift += digit) {
      std::fill(count.begin(), count.end(), 0);
      for (int64_t i = 0; i < m; ++i) ++count[a[i] >> shift & mask];
      int32_t sum = 0;
      for (auto& c : count) {
        const int32_t here = c;
        c = sum;
        sum += here;
      }
      for (int64_t i = 0; i < m; ++i) b[count[a[i] >> shift & mask]++] = a[i];
      std::swap(a, b);
    }
    sorted = a;
    distinct = 0;
    for (int64_t i = 0; i < m; ++i) {
      const int32_t r = int32_t(a[i] >> 32);
      if (i == 0 || r != row[distinct - 1]) {
        row[distinct] = r;
        start[distinct++] = int32_t(i);
      }
    }
    start[distinct] = int32_t(m);
  }

  int32_t Entry(int64_t i) const { return int32_t(sorted[i] & 0xFFFFFFFFu); }

  const uint64_t* sorted = nullptr;  // piece p's keys after Sort(p)
};

}  // namespace lf_jax_kernels

#endif  // LF_JAX_KERNELS_ENTRY_DEDUPE_H_
