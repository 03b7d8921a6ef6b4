// Fused CPU kernels of the embedding engine's local sparse step, called through XLA's FFI
// (lf_jax/embedding/kernels/fused.py registers and calls them; build.py compiles this file).
//
// LfPool: the pooled forward of a table group. Entry e of example n adds
//   coef[n, e] * table[rows[n, e]] into out[n, out_col[e]] (rows < 0: padding, skipped;
//   rows >= R clamped to R - 1, as XLA's gather clips).
// LfUpdate{Sgd,Adagrad,Adam}: the sparse update. For each piece p (a table of the group;
//   its entry columns piece_cols[p, :], -1 padded) the entries' gradients
//   coef[n, e] * grad[n, out_col[e]] are summed per distinct row (a radix sort of the
//   entries by row, stable: a row's entries are summed in entry order into one
//   D-vector) and the optimizer is applied to the rows in ascending order, in place: on the
//   table and slots that XLA aliases to the outputs (the caller donates them). Rows < 0
//   or >= R are skipped, as XLA's scatter drops them. Same math as
//   lf_jax/embedding/sparse_optim.py.
//
// Shapes: table [R, D] float32 | bfloat16 | float16 (or [1, R, D]: leading axes of size 1,
// as shard_map hands a device's block, passed as they are so that XLA aliases the donated
// buffer without a copy); rows, coef [N, E]; out_col [E];
// out, grad [N, C, D] float32 (the update's grad may come as k equal blocks [N / k, C, D]:
// the first in grad's place, the others after step, e.g. the per-peer results of an
// all_to_all, read where they are); piece_cols [P, W]; step [] int32 (1-based);
// row-wise Adagrad accumulator [R] (or [1, R]); Adam mu, nu like the table, float32.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "element_types.h"
#include "entry_dedupe.h"
#include "scratch.h"
#include "update_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using lf_jax_kernels::BF16;
using lf_jax_kernels::Dedupe;
using lf_jax_kernels::F16;
using lf_jax_kernels::F32;
using lf_jax_kernels::Invalid;
using lf_jax_kernels::Adagrad;
using lf_jax_kernels::Adam;
using lf_jax_kernels::ApplyDistinct;
using lf_jax_kernels::GradRows;
using lf_jax_kernels::Lease;
using lf_jax_kernels::MakeAdam;
using lf_jax_kernels::PrefetchRow;
using lf_jax_kernels::Sgd;

template <class Ty>
void Pool(const typename Ty::T* table, int64_t R, int64_t D, const int32_t* rows,
          const float* coef, const int32_t* out_col, int64_t N, int64_t E, int64_t C,
          float* out) {
  constexpr int64_t kAhead = 16;  // entries to prefetch ahead: table rows are random reads
  std::memset(out, 0, sizeof(float) * N * C * D);
  const int64_t total = N * E;
  for (int64_t n = 0; n < N; ++n) {
    const int32_t* rows_e = rows + n * E;
    const float* coef_e = coef + n * E;
    float* out_cd = out + n * C * D;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t ahead = n * E + e + kAhead;
      if (ahead < total && rows[ahead] >= 0 && rows[ahead] < R) {
        PrefetchRow(table + rows[ahead] * D, D);
      }
      int64_t r = rows_e[e];
      if (r < 0) continue;
      if (r >= R) r = R - 1;
      const float c = coef_e[e];
      const typename Ty::T* src = table + r * D;
      float* dst = out_cd + out_col[e] * D;
      for (int64_t d = 0; d < D; ++d) dst[d] += c * Ty::load(src[d]);
    }
  }
}

template <class Ty, class Opt>
void Update(typename Ty::T* table, int64_t R, int64_t D, const Opt& opt, const int32_t* rows,
            const float* coef, const int32_t* out_col, int64_t N, int64_t E, int64_t C,
            const int32_t* piece_cols, int64_t P, int64_t W, const GradRows& grad) {
  // scratch kept between calls, one per concurrent call (the owners of an exchange
  // update at once; a lock around one scratch made them wait for each other)
  Lease<Dedupe> lease;
  Dedupe& dd = *lease;
  std::vector<float> g(D), delta(D);
  dd.Collect(rows, coef, out_col, piece_cols, P, W, N, E, C, R);
  for (int64_t p = 0; p < P; ++p) {
    dd.Sort(p, N, W, R);
    ApplyDistinct<Ty>(table, D, opt, dd, grad, g.data(), delta.data());
  }
}

struct Entries {  // the arguments every update shares, checked
  ffi::Buffer<ffi::S32> rows;
  ffi::Buffer<ffi::F32> coef;
  ffi::Buffer<ffi::S32> out_col;
  ffi::Buffer<ffi::S32> piece_cols;
  ffi::Buffer<ffi::F32> grad;
  ffi::RemainingArgs more;  // further blocks of grad, the same shape (none: grad is whole)
};

template <class Opt>
ffi::Error RunUpdate(ffi::AnyBuffer table, const Entries& x, const Opt& opt) {
  auto td = table.dimensions();
  auto rd = x.rows.dimensions();
  auto gd = x.grad.dimensions();
  auto pd = x.piece_cols.dimensions();
  if (td.size() < 2 || rd.size() != 2 || gd.size() != 3 || pd.size() != 2) {
    return Invalid("lf_jax update: expected table [..., R, D], rows [N, E], grad [N, C, D]");
  }
  const int64_t D = td[td.size() - 1], R = int64_t(table.element_count()) / D;
  const int64_t N = rd[0], E = rd[1], C = gd[1];
  GradRows grad{{x.grad.typed_data()}, gd[0] * C, D};
  for (size_t i = 0; i < x.more.size(); ++i) {
    auto block = x.more.get<ffi::Buffer<ffi::F32>>(i);
    if (!block.has_value() || block->dimensions().size() != 3 ||
        block->element_count() != x.grad.element_count()) {
      return Invalid("lf_jax update: gradient blocks must all be [N / blocks, C, D] float32");
    }
    grad.blocks.push_back(block->typed_data());
  }
  if (gd[0] * int64_t(grad.blocks.size()) != N || gd[2] != D || x.coef.element_count() != size_t(N * E) ||
      x.out_col.element_count() != size_t(E)) {
    return Invalid("lf_jax update: mismatched shapes of rows, coef, out_col or grad");
  }
  if (N * pd[0] * pd[1] >= (int64_t(1) << 31) || N * C >= (int64_t(1) << 31)) {
    return Invalid("lf_jax update: more than 2^31 - 1 entries or gradient rows");
  }
  const int32_t* rows = x.rows.typed_data();
  const float* coef = x.coef.typed_data();
  const int32_t* cols = x.out_col.typed_data();
  const int32_t* pieces = x.piece_cols.typed_data();
  void* data = table.untyped_data();
  switch (table.element_type()) {
    case ffi::DataType::F32:
      Update<F32>(static_cast<float*>(data), R, D, opt, rows, coef, cols, N, E, C, pieces, pd[0],
                  pd[1], grad);
      break;
    case ffi::DataType::BF16:
      Update<BF16>(static_cast<uint16_t*>(data), R, D, opt, rows, coef, cols, N, E, C, pieces,
                   pd[0], pd[1], grad);
      break;
    case ffi::DataType::F16:
      Update<F16>(static_cast<_Float16*>(data), R, D, opt, rows, coef, cols, N, E, C, pieces,
                  pd[0], pd[1], grad);
      break;
    default:
      return Invalid("lf_jax update: table dtype must be float32, bfloat16 or float16");
  }
  return ffi::Error::Success();
}

ffi::Error PoolImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::F32> coef,
                    ffi::Buffer<ffi::S32> out_col, ffi::ResultBuffer<ffi::F32> out) {
  auto td = table.dimensions();
  auto rd = rows.dimensions();
  auto od = out->dimensions();
  if (td.size() < 2 || rd.size() != 2 || od.size() != 3) {
    return Invalid("lf_jax pool: expected table [..., R, D], rows [N, E], out [N, C, D]");
  }
  const int64_t D = td[td.size() - 1], R = int64_t(table.element_count()) / D;
  const int64_t N = rd[0], E = rd[1], C = od[1];
  if (od[0] != N || od[2] != D || coef.element_count() != size_t(N * E) ||
      out_col.element_count() != size_t(E)) {
    return Invalid("lf_jax pool: mismatched shapes of rows, coef, out_col or out");
  }
  void* data = table.untyped_data();
  float* o = out->typed_data();
  switch (table.element_type()) {
    case ffi::DataType::F32:
      Pool<F32>(static_cast<const float*>(data), R, D, rows.typed_data(), coef.typed_data(),
                out_col.typed_data(), N, E, C, o);
      break;
    case ffi::DataType::BF16:
      Pool<BF16>(static_cast<const uint16_t*>(data), R, D, rows.typed_data(), coef.typed_data(),
                 out_col.typed_data(), N, E, C, o);
      break;
    case ffi::DataType::F16:
      Pool<F16>(static_cast<const _Float16*>(data), R, D, rows.typed_data(), coef.typed_data(),
                out_col.typed_data(), N, E, C, o);
      break;
    default:
      return Invalid("lf_jax pool: table dtype must be float32, bfloat16 or float16");
  }
  return ffi::Error::Success();
}

ffi::Error SgdImpl(ffi::AnyBuffer, ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::F32> coef,
                   ffi::Buffer<ffi::S32> out_col, ffi::Buffer<ffi::S32> piece_cols,
                   ffi::Buffer<ffi::F32> grad, ffi::Buffer<ffi::S32>, ffi::RemainingArgs more,
                   ffi::Result<ffi::AnyBuffer> table, float lr) {
  return RunUpdate(*table, Entries{rows, coef, out_col, piece_cols, grad, more}, Sgd{lr});
}

ffi::Error AdagradImpl(ffi::AnyBuffer, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::S32> rows,
                       ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::S32> out_col,
                       ffi::Buffer<ffi::S32> piece_cols, ffi::Buffer<ffi::F32> grad,
                       ffi::Buffer<ffi::S32>, ffi::RemainingArgs more,
                       ffi::Result<ffi::AnyBuffer> table,
                       ffi::ResultBuffer<ffi::F32> acc, float lr, float eps) {
  auto td = table->dimensions();
  if (acc->element_count() != table->element_count() / size_t(td[td.size() - 1])) {
    return Invalid("lf_jax update: accumulator must hold one value per row");
  }
  return RunUpdate(*table, Entries{rows, coef, out_col, piece_cols, grad, more},
                   Adagrad{lr, eps, acc->typed_data()});
}

ffi::Error AdamImpl(ffi::AnyBuffer, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                    ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::F32> coef,
                    ffi::Buffer<ffi::S32> out_col, ffi::Buffer<ffi::S32> piece_cols,
                    ffi::Buffer<ffi::F32> grad, ffi::Buffer<ffi::S32> step, ffi::RemainingArgs more,
                    ffi::Result<ffi::AnyBuffer> table, ffi::ResultBuffer<ffi::F32> mu,
                    ffi::ResultBuffer<ffi::F32> nu, float lr, float b1, float b2,
                    float one_minus_b1, float one_minus_b2, float eps) {
  if (mu->element_count() != table->element_count() ||
      nu->element_count() != table->element_count()) {
    return Invalid("lf_jax update: Adam moments must be [R, D]");
  }
  const Adam opt = MakeAdam(lr, b1, b2, one_minus_b1, one_minus_b2, eps, step.typed_data()[0],
                            mu->typed_data(), nu->typed_data(),
                            table->dimensions()[table->dimensions().size() - 1]);
  return RunUpdate(*table, Entries{rows, coef, out_col, piece_cols, grad, more}, opt);
}

}  // namespace

#define LF_ENTRY_ARGS                 \
  .Arg<ffi::Buffer<ffi::S32>>()       \
      .Arg<ffi::Buffer<ffi::F32>>()   \
      .Arg<ffi::Buffer<ffi::S32>>()   \
      .Arg<ffi::Buffer<ffi::S32>>()   \
      .Arg<ffi::Buffer<ffi::F32>>()   \
      .Arg<ffi::Buffer<ffi::S32>>()   \
      .RemainingArgs()

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfPool, PoolImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfUpdateSgd, SgdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>() LF_ENTRY_ARGS
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("learning_rate"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfUpdateAdagrad, AdagradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>() LF_ENTRY_ARGS
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  LF_ADAGRAD_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfUpdateAdam, AdamImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>() LF_ENTRY_ARGS
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  LF_ADAM_ATTRS);
