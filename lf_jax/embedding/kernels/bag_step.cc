// Fused CPU kernels of the owner-routed exchange in bag mode (owner-side pooling of
// partial bags), called through XLA's FFI (lf_jax/embedding/kernels/bag.py).
//
// LfBagLayout: a requester's layout, one pass over its [N, E] entries (slot: owner, < 0
//   padding; local row; coef; out_col [E]: each entry column's output column k < K).
//   Per owner s: its entries in entry order, packed [S, Ce, 3] int32 (local row, partial
//   slot j, coef's bits; row -1 past the owner's count); each (example n, column k) bag
//   with an entry at s gets partial slot j in order of first appearance: index [N, K * S]
//   holds s * Cb + j at column k * S + s (-1: none), bag_of [S, Cb] holds n * K + k (N * K
//   where empty). most [2]: the most entries and partial slots of one owner; an entry
//   past Ce, or of a bag past Cb, is not placed (the caller's overflow: most > capacity).
// LfPoolTo: at the owner, sender s's received entry i (rows, dst, coef [S, X]) adds
//   coef * table[row] into row dst of result s ([Cb, D] float32 each, one per sender, as
//   the all_to_all takes them); rows outside [0, R) or dst outside [0, Cb) are skipped.
// LfUpdateBag{Sgd,Adagrad,Adam}: at the owner, entry i of sender s has gradient
//   coef * grad_s[dst] (grad: S blocks [Cb, D] as received); summed per distinct row
//   (update_rows.h, entry_dedupe.h's radix sort, entry order) and the optimizer applied
//   once per row, in place on the aliased table and slots, as LfUpdate* do.
//
// Shapes: table [..., R, D] float32 | bfloat16 | float16; D the last axis.

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

using lf_jax_kernels::Adagrad;
using lf_jax_kernels::Adam;
using lf_jax_kernels::ApplyDistinct;
using lf_jax_kernels::BF16;
using lf_jax_kernels::Dedupe;
using lf_jax_kernels::F16;
using lf_jax_kernels::F32;
using lf_jax_kernels::GradRows;
using lf_jax_kernels::Invalid;
using lf_jax_kernels::Lease;
using lf_jax_kernels::MakeAdam;
using lf_jax_kernels::PrefetchRow;
using lf_jax_kernels::Sgd;

constexpr int64_t kInt32 = int64_t(1) << 31;

ffi::Error BagLayoutImpl(ffi::Buffer<ffi::S32> slot, ffi::Buffer<ffi::S32> local,
                         ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::S32> out_col,
                         ffi::ResultBuffer<ffi::S32> packed, ffi::ResultBuffer<ffi::S32> index,
                         ffi::ResultBuffer<ffi::S32> bag_of, ffi::ResultBuffer<ffi::S32> most) {
  auto sd = slot.dimensions();
  auto pd = packed->dimensions();
  auto bd = bag_of->dimensions();
  if (sd.size() != 2 || pd.size() != 3 || pd[2] != 3 || bd.size() != 2 || bd[0] != pd[0] ||
      most->element_count() != 2) {
    return Invalid("lf_jax bag layout: expected slot [N, E], packed [S, Ce, 3], bag_of [S, Cb]");
  }
  const int64_t N = sd[0], E = sd[1], S = pd[0], Ce = pd[1], Cb = bd[1];
  if (local.element_count() != size_t(N * E) || coef.element_count() != size_t(N * E) ||
      out_col.element_count() != size_t(E) || N * S == 0 ||
      index->element_count() % size_t(N * S) != 0) {
    return Invalid("lf_jax bag layout: mismatched shapes of local, coef, out_col or index");
  }
  const int64_t K = int64_t(index->element_count()) / (N * S);
  if (N * K * S >= kInt32 || S * Cb >= kInt32 || N * E >= kInt32) {
    return Invalid("lf_jax bag layout: entries, bags or partial slots exceed int32");
  }
  const int32_t* s_ne = slot.typed_data();
  const int32_t* l_ne = local.typed_data();
  const float* c_ne = coef.typed_data();
  const int32_t* col = out_col.typed_data();
  int32_t* pk = packed->typed_data();
  int32_t* ix = index->typed_data();
  int32_t* bo = bag_of->typed_data();
  for (int64_t e = 0; e < E; ++e) {
    if (col[e] < 0 || col[e] >= K) return Invalid("lf_jax bag layout: out_col outside [0, K)");
  }
  std::vector<int32_t> entries(S, 0), bags(S, 0);
  constexpr int32_t kNone = -1, kOver = -2;  // no slot yet; the bag overflowed Cb
  std::fill(ix, ix + N * K * S, kNone);
  for (int64_t n = 0; n < N; ++n) {
    int32_t* ix_n = ix + n * K * S;
    for (int64_t e = 0; e < E; ++e) {
      const int32_t s = s_ne[n * E + e];
      if (s < 0 || s >= S) continue;
      int32_t& at = ix_n[col[e] * S + s];
      if (at == kNone) {
        const int32_t j = bags[s]++;
        at = j < Cb ? int32_t(s * Cb + j) : kOver;
        if (j < Cb) bo[s * Cb + j] = int32_t(n * K + col[e]);
      }
      const int32_t i = entries[s]++;
      if (i >= Ce) continue;
      int32_t* p = pk + (s * Ce + i) * 3;
      if (at == kOver) {  // its bag has no slot: an empty place
        p[0] = -1, p[1] = -1, p[2] = 0;
        continue;
      }
      p[0] = l_ne[n * E + e];
      p[1] = at - int32_t(s * Cb);
      std::memcpy(p + 2, c_ne + n * E + e, sizeof(float));
    }
  }
  std::replace(ix, ix + N * K * S, kOver, kNone);
  int32_t most_entries = 0, most_bags = 0;
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t i = std::min<int64_t>(entries[s], Ce); i < Ce; ++i) {
      int32_t* p = pk + (s * Ce + i) * 3;
      p[0] = -1, p[1] = -1, p[2] = 0;
    }
    std::fill(bo + s * Cb + std::min<int64_t>(bags[s], Cb), bo + (s + 1) * Cb, int32_t(N * K));
    most_entries = std::max(most_entries, entries[s]);
    most_bags = std::max(most_bags, bags[s]);
  }
  most->typed_data()[0] = most_entries;
  most->typed_data()[1] = most_bags;
  return ffi::Error::Success();
}

template <class Ty>
void PoolTo(const typename Ty::T* table, int64_t R, int64_t D, const int32_t* rows,
            const int32_t* dst, const float* coef, int64_t S, int64_t X, int64_t Cb,
            const std::vector<float*>& out) {
  constexpr int64_t kAhead = 16;  // entries to prefetch ahead: table rows are random reads
  const int64_t total = S * X;
  for (int64_t s = 0, i = 0; s < S; ++s) {
    float* out_s = out[s];
    // Slots below `next` hold a sum. The requester numbers a sender's partial slots in
    // order of first appearance, so an entry with j >= next is its slot's first: it
    // writes the slot (zeroing any skipped ones) instead of adding to a zero fill.
    int64_t next = 0;
    for (int64_t x = 0; x < X; ++x, ++i) {
      if (i + kAhead < total && rows[i + kAhead] >= 0 && rows[i + kAhead] < R) {
        PrefetchRow(table + int64_t(rows[i + kAhead]) * D, D);
      }
      const int32_t r = rows[i], j = dst[i];
      if (r < 0 || r >= R || j < 0 || j >= Cb) continue;
      const float c = coef[i];
      const typename Ty::T* src = table + int64_t(r) * D;
      float* o = out_s + int64_t(j) * D;
      if (j >= next) {
        std::memset(out_s + next * D, 0, sizeof(float) * (j - next) * D);
        for (int64_t d = 0; d < D; ++d) o[d] = c * Ty::load(src[d]);
        next = j + 1;
      } else {
        for (int64_t d = 0; d < D; ++d) o[d] += c * Ty::load(src[d]);
      }
    }
    std::memset(out_s + next * D, 0, sizeof(float) * (Cb - next) * D);  // unused slots
  }
}

struct BagShapes {
  int64_t S, X, R, D;  // senders, entries per sender, table rows, dim
};

// The received entries' and the table's shapes, checked: rows, dst, coef [S, X]; S
// gradient or result blocks; table [..., R, D] (``table_error`` if not, or if S = 0).
ffi::ErrorOr<BagShapes> BagShape(ffi::AnyBuffer& table, ffi::Buffer<ffi::S32>& rows,
                                 ffi::Buffer<ffi::S32>& dst, ffi::Buffer<ffi::F32>& coef,
                                 size_t blocks, const char* table_error) {
  auto rd = rows.dimensions();
  if (rd.size() != 2 || dst.element_count() != rows.element_count() ||
      coef.element_count() != rows.element_count() || size_t(rd[0]) != blocks) {
    return ffi::Unexpected(
        Invalid("lf_jax bag: expected rows, dst, coef [S, X] and S blocks [Cb, D]"));
  }
  auto td = table.dimensions();
  if (td.size() < 2 || rd[0] == 0) return ffi::Unexpected(Invalid(table_error));
  const int64_t D = td[td.size() - 1];
  return BagShapes{rd[0], rd[1], int64_t(table.element_count()) / D, D};
}

ffi::Error PoolToImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> dst,
                      ffi::Buffer<ffi::F32> coef, ffi::RemainingRets out) {
  auto shape = BagShape(table, rows, dst, coef, out.size(),
                        "lf_jax pool_to: expected table [..., R, D]");
  if (!shape.has_value()) return shape.error();
  const auto [S, X, R, D] = *shape;
  std::vector<float*> blocks(S);
  int64_t Cb = -1;
  for (int64_t s = 0; s < S; ++s) {
    auto block = out.get<ffi::Buffer<ffi::F32>>(s);
    if (!block.has_value() || (*block)->element_count() % size_t(D) != 0 ||
        (Cb >= 0 && int64_t((*block)->element_count()) != Cb * D)) {
      return Invalid("lf_jax pool_to: expected S equal [Cb, D] float32 results");
    }
    Cb = int64_t((*block)->element_count()) / D;
    blocks[s] = (*block)->typed_data();
  }
  const void* data = table.untyped_data();
  const int32_t *r = rows.typed_data(), *j = dst.typed_data();
  const float* c = coef.typed_data();
  switch (table.element_type()) {
    case ffi::DataType::F32:
      PoolTo<F32>(static_cast<const float*>(data), R, D, r, j, c, S, X, Cb, blocks);
      break;
    case ffi::DataType::BF16:
      PoolTo<BF16>(static_cast<const uint16_t*>(data), R, D, r, j, c, S, X, Cb, blocks);
      break;
    case ffi::DataType::F16:
      PoolTo<F16>(static_cast<const _Float16*>(data), R, D, r, j, c, S, X, Cb, blocks);
      break;
    default:
      return Invalid("lf_jax pool_to: table dtype must be float32, bfloat16 or float16");
  }
  return ffi::Error::Success();
}

template <class Ty, class Opt>
void UpdateBag(typename Ty::T* table, int64_t R, int64_t D, const Opt& opt, const int32_t* rows,
               const int32_t* dst, const float* coef, int64_t S, int64_t X, int64_t Cb,
               const GradRows& grad) {
  Lease<Dedupe> lease;  // one scratch per concurrent call (scratch.h)
  Dedupe& dd = *lease;
  std::vector<float> g(D), delta(D);
  dd.CollectBag(rows, dst, coef, S, X, Cb, R);
  dd.Sort(0, S * X, 1, R);
  ApplyDistinct<Ty>(table, D, opt, dd, grad, g.data(), delta.data());
}

template <class Opt>
ffi::Error RunUpdateBag(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> rows,
                        ffi::Buffer<ffi::S32> dst, ffi::Buffer<ffi::F32> coef,
                        ffi::RemainingArgs grads, const Opt& opt) {
  auto shape = BagShape(table, rows, dst, coef, grads.size(),
                        "lf_jax update_bag: expected table [..., R, D]");
  if (!shape.has_value()) return shape.error();
  const auto [S, X, R, D] = *shape;
  GradRows grad{{}, 0, D};
  for (int64_t s = 0; s < S; ++s) {
    auto block = grads.get<ffi::Buffer<ffi::F32>>(s);
    if (!block.has_value() || block->element_count() % size_t(D) != 0 ||
        (s > 0 && int64_t(block->element_count()) != grad.per * D)) {
      return Invalid("lf_jax update_bag: expected S equal [Cb, D] float32 gradient blocks");
    }
    grad.per = int64_t(block->element_count()) / D;
    grad.blocks.push_back(block->typed_data());
  }
  if (S * X >= kInt32 || S * grad.per >= kInt32) {
    return Invalid("lf_jax update_bag: more than 2^31 - 1 entries or gradient rows");
  }
  const int32_t *r = rows.typed_data(), *j = dst.typed_data();
  const float* c = coef.typed_data();
  void* data = table.untyped_data();
  switch (table.element_type()) {
    case ffi::DataType::F32:
      UpdateBag<F32>(static_cast<float*>(data), R, D, opt, r, j, c, S, X, grad.per, grad);
      break;
    case ffi::DataType::BF16:
      UpdateBag<BF16>(static_cast<uint16_t*>(data), R, D, opt, r, j, c, S, X, grad.per, grad);
      break;
    case ffi::DataType::F16:
      UpdateBag<F16>(static_cast<_Float16*>(data), R, D, opt, r, j, c, S, X, grad.per, grad);
      break;
    default:
      return Invalid("lf_jax update_bag: table dtype must be float32, bfloat16 or float16");
  }
  return ffi::Error::Success();
}

ffi::Error SgdBagImpl(ffi::AnyBuffer, ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> dst,
                      ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::S32>, ffi::RemainingArgs grads,
                      ffi::Result<ffi::AnyBuffer> table, float lr) {
  return RunUpdateBag(*table, rows, dst, coef, grads, Sgd{lr});
}

ffi::Error AdagradBagImpl(ffi::AnyBuffer, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::S32> rows,
                          ffi::Buffer<ffi::S32> dst, ffi::Buffer<ffi::F32> coef,
                          ffi::Buffer<ffi::S32>, ffi::RemainingArgs grads,
                          ffi::Result<ffi::AnyBuffer> table, ffi::ResultBuffer<ffi::F32> acc,
                          float lr, float eps) {
  auto td = table->dimensions();
  if (acc->element_count() != table->element_count() / size_t(td[td.size() - 1])) {
    return Invalid("lf_jax update_bag: accumulator must hold one value per row");
  }
  return RunUpdateBag(*table, rows, dst, coef, grads, Adagrad{lr, eps, acc->typed_data()});
}

ffi::Error AdamBagImpl(ffi::AnyBuffer, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                       ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> dst,
                       ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::S32> step,
                       ffi::RemainingArgs grads, ffi::Result<ffi::AnyBuffer> table,
                       ffi::ResultBuffer<ffi::F32> mu, ffi::ResultBuffer<ffi::F32> nu, float lr,
                       float b1, float b2, float one_minus_b1, float one_minus_b2, float eps) {
  if (mu->element_count() != table->element_count() ||
      nu->element_count() != table->element_count()) {
    return Invalid("lf_jax update_bag: Adam moments must be [R, D]");
  }
  const Adam opt = MakeAdam(lr, b1, b2, one_minus_b1, one_minus_b2, eps, step.typed_data()[0],
                            mu->typed_data(), nu->typed_data(),
                            table->dimensions()[table->dimensions().size() - 1]);
  return RunUpdateBag(*table, rows, dst, coef, grads, opt);
}

}  // namespace

#define LF_BAG_ARGS                 \
  .Arg<ffi::Buffer<ffi::S32>>()     \
      .Arg<ffi::Buffer<ffi::S32>>() \
      .Arg<ffi::Buffer<ffi::F32>>() \
      .Arg<ffi::Buffer<ffi::S32>>() \
      .RemainingArgs()

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfBagLayout, BagLayoutImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfPoolTo, PoolToImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfUpdateBagSgd, SgdBagImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>() LF_BAG_ARGS
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("learning_rate"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfUpdateBagAdagrad, AdagradBagImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>() LF_BAG_ARGS
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  LF_ADAGRAD_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfUpdateBagAdam, AdamBagImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>() LF_BAG_ARGS
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  LF_ADAM_ATTRS);
