// The sparse update's per-row step shared by the fused update kernels (sparse_step.cc:
// entries of [N, E] examples; bag_step.cc: entries an owner received in bag mode): the
// gradient rows, the optimizers and the loop over a Dedupe's distinct rows. Included by
// the kernel sources; build.py keys the cached library by this header too.
#ifndef LF_JAX_KERNELS_UPDATE_ROWS_H_
#define LF_JAX_KERNELS_UPDATE_ROWS_H_

#include <cmath>
#include <cstdint>
#include <vector>

#include "entry_dedupe.h"

namespace lf_jax_kernels {

// Prefetches the cache lines of a row of n elements of T (locality 3, for reading; the
// update's rows are read before they are written).
template <class T>
void PrefetchRow(const T* row, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < n; i += kLine) __builtin_prefetch(row + i);
}

// sum of x[d]^2 in 8 lanes: a float sum in order is a chain of D dependent adds (XLA:CPU
// sums the dot with ones in vector lanes too; the order differs from both by rounding)
inline float SumOfSquares(const float* x, int64_t n) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t body = n - n % 8;
  for (int64_t d = 0; d < body; d += 8) {
    for (int j = 0; j < 8; ++j) lanes[j] += x[d + j] * x[d + j];
  }
  for (int64_t d = body; d < n; ++d) lanes[0] += x[d] * x[d];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// Gradient rows n * C + c of grad [N, C, D], given as one buffer or as equal blocks
// [N / blocks, C, D] (an exchange's per-peer results, not concatenated).
struct GradRows {
  std::vector<const float*> blocks;
  int64_t per = 0, D = 0;  // rows of a block, dim
  const float* Row(int64_t i) const {
    return blocks.size() == 1 ? blocks[0] + i * D : blocks[i / per] + (i % per) * D;
  }
};

// Sums distinct row u's entry gradients into g [D], in entry order.
inline void RowGradient(const Dedupe& dd, int64_t u, const GradRows& grad, int64_t D, float* g) {
  for (int64_t d = 0; d < D; ++d) g[d] = 0.0f;
  for (int32_t i = dd.start[u]; i < dd.start[u + 1]; ++i) {
    const int32_t k = dd.Entry(i);
    const float c = dd.coef[k];
    const float* s = grad.Row(dd.src[k]);
    for (int64_t d = 0; d < D; ++d) g[d] += c * s[d];
  }
}

// Adds delta [D] to table row r (float32: in place; 16-bit: old + delta rounded once).
template <class Ty>
void AddRow(typename Ty::T* table, int64_t r, int64_t D, const float* delta) {
  typename Ty::T* dst = table + r * D;
  for (int64_t d = 0; d < D; ++d) dst[d] = Ty::store(Ty::load(dst[d]) + delta[d]);
}

struct Sgd {
  float lr;
  void Delta(int64_t, int64_t D, const float* g, float* delta) const {
    for (int64_t d = 0; d < D; ++d) delta[d] = -lr * g[d];
  }
  void Prefetch(int64_t) const {}
};

struct Adagrad {  // one accumulator per row: acc += mean(g^2); delta = -lr g / (sqrt(acc) + eps)
  float lr, eps;
  float* acc;
  void Delta(int64_t r, int64_t D, const float* g, float* delta) const {
    const float a = acc[r] + SumOfSquares(g, D) / float(D);
    acc[r] = a;
    const float scale = -lr / (std::sqrt(a) + eps);
    for (int64_t d = 0; d < D; ++d) delta[d] = scale * g[d];
  }
  void Prefetch(int64_t r) const { __builtin_prefetch(acc + r); }
};

struct Adam {  // lazy Adam, bias correction from the global step
  float lr, b1, b2, one_minus_b1, one_minus_b2, eps, correct1, correct2;
  float *mu, *nu;
  int64_t dim;
  void Delta(int64_t r, int64_t D, const float* g, float* delta) const {
    float* m = mu + r * D;
    float* v = nu + r * D;
    for (int64_t d = 0; d < D; ++d) {
      m[d] = b1 * m[d] + one_minus_b1 * g[d];
      v[d] = b2 * v[d] + one_minus_b2 * (g[d] * g[d]);
      delta[d] = -lr * (m[d] / correct1) / (std::sqrt(v[d] / correct2) + eps);
    }
  }
  void Prefetch(int64_t r) const {
    PrefetchRow(mu + r * dim, dim);
    PrefetchRow(nu + r * dim, dim);
  }
};

// Applies opt to every distinct row of dd's piece p (after dd.Sort(p)): the row's entry
// gradients summed in entry order, then opt's delta added into the table, rows ascending,
// the next kAhead rows' table rows, slots and first gradient prefetched.
template <class Ty, class Opt>
void ApplyDistinct(typename Ty::T* table, int64_t D, const Opt& opt, const Dedupe& dd,
                   const GradRows& grad, float* g, float* delta) {
  constexpr int64_t kAhead = 4;  // distinct rows to prefetch ahead
  for (int64_t u = 0; u < dd.distinct; ++u) {
    if (u + kAhead < dd.distinct) {  // the rows, slots and first gradient ahead
      const int64_t ahead = dd.row[u + kAhead];
      PrefetchRow(table + ahead * D, D);
      opt.Prefetch(ahead);
      PrefetchRow(grad.Row(dd.src[dd.Entry(dd.start[u + kAhead])]), D);
    }
    const int64_t r = dd.row[u];
    RowGradient(dd, u, grad, D, g);
    opt.Delta(r, D, g, delta);
    AddRow<Ty>(table, r, D, delta);
  }
}

// Lazy Adam of an update call: its attributes, the 1-based step and the moments [R, D].
inline Adam MakeAdam(float lr, float b1, float b2, float one_minus_b1, float one_minus_b2,
                     float eps, int32_t step, float* mu, float* nu, int64_t dim) {
  const float t = float(step);
  return Adam{lr,  b1, b2, one_minus_b1, one_minus_b2, eps, 1.0f - std::pow(b1, t),
              1.0f - std::pow(b2, t), mu, nu, dim};
}

}  // namespace lf_jax_kernels

// The FFI attributes of the optimizers' update handlers (sparse_step.cc, bag_step.cc).
#define LF_ADAGRAD_ATTRS .Attr<float>("learning_rate").Attr<float>("eps")
#define LF_ADAM_ATTRS                                                                       \
  .Attr<float>("learning_rate").Attr<float>("b1").Attr<float>("b2").Attr<float>(           \
      "one_minus_b1")                                                                      \
      .Attr<float>("one_minus_b2")                                                         \
      .Attr<float>("eps")

#endif  // LF_JAX_KERNELS_UPDATE_ROWS_H_
