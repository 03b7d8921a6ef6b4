// Fused CPU kernels of the owner-routed exchange's local work, called through XLA's FFI
// (lf_jax/embedding/kernels/route.py wraps them; build.py links this file with the
// others). The XLA path of the same steps is lf_jax/embedding/buckets.py.
//
// LfRoute: the one-round layout of a device's M entries (Buckets.build): an open-addressing
//   hash dedupe of the keys slot * R + local (one pass over the entries, no sort), each
//   distinct key placed in its owner's bucket in order of first appearance. Outputs:
//   ask [S, C] the local rows to ask owner s for (R where the bucket is shorter), entry
//   [M] each entry's place s * C + rank in the [S * C] layout (0 for padding, slot < 0,
//   and for keys past a full bucket), first [S, C] the entry that leads each place (M
//   where empty), count [S] the distinct keys of each owner (may exceed C: the caller
//   then takes the sorted rounds).
// LfSumPlaces: the update's row-gradient sums in the send layout (buckets.sum_into_layout).
//   Entry m = n * E + e adds coef[n, e] * grad[n, out_col[e]] into place[m] (places
//   outside [0, S * C) skipped). Each place is written from its first entry (first[p] <
//   M; 0 where none) and the other entries of the place are added in entry order, in one
//   pass over the entries: first[p], where < M, must be the earliest entry of place p
//   (LfRoute's first appearance; an entry before it is an error). No zero fill of the
//   places that have a first. Results: S blocks [C, D] (one per owner: XLA hands each to
//   its peer of the all_to_all without a copy) or one [S, C, D].
// LfGatherAsked: the owner's rows for its asking peers (exchange.owner_rows): S results
//   [C, D] float32, block s row c = table[asked[s, c]] (0 where asked is out of [0, R)).
// LfPoolParts: the pooled forward from the rows an exchange received (lookup.GroupRoute.pool
//   on the [S * C, D] rows): entry (n, e) adds coef[n, e] * row place[n, e] into out[n,
//   out_col[e]] (place < 0 skipped, past S * C clamped), the rows given as the S blocks
//   [C, D] of the all_to_all's per-peer results: no concatenation copy first.
//
// Shapes: slot, local, entry [M] int32; ask, first [S, C] int32; count [S] int32;
// place [N, E] int32, coef [N, E] float32, out_col [E] int32, grad [N, C_out, D] float32;
// table [..., R, D] float32 | bfloat16 | float16.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "divide.h"
#include "element_types.h"
#include "scratch.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using lf_jax_kernels::BF16;
using lf_jax_kernels::DivBy;
using lf_jax_kernels::F16;
using lf_jax_kernels::F32;
using lf_jax_kernels::Fmix32;
using lf_jax_kernels::Invalid;
using lf_jax_kernels::Lease;

namespace {

// A hash table reused between calls (a Lease): key, value pairs in `cell`, key -1 empty
// (kept empty between calls); `used`: the cells this call filled, emptied before it returns.
struct HashTable {
  std::vector<int32_t> cell;
  std::vector<uint32_t> used;
};

void Route(const int32_t* slot, const int32_t* local, int64_t M, int64_t S, int64_t C, int64_t R,
           int32_t* ask, int32_t* entry, int32_t* first, int32_t* count, HashTable& hash) {
  int64_t size = 16;
  while (size < M + M / 2) size <<= 1;  // load <= 2/3 (0.4 with ids in 60% of entries)
  const uint32_t mask = uint32_t(size - 1);
  if (int64_t(hash.cell.size()) != 2 * size) hash.cell.assign(2 * size, -1);
  hash.used.clear();
  int32_t* cell = hash.cell.data();
  std::fill(ask, ask + S * C, int32_t(R));
  std::fill(first, first + S * C, int32_t(M));
  std::fill(count, count + S, 0);
  constexpr int64_t kAhead = 16;  // entries whose cells are prefetched ahead (random reads)
  auto cell_of = [&](int64_t m) { return Fmix32(uint32_t(slot[m] * R + local[m])) & mask; };
  for (int64_t m = 0; m < M; ++m) {
    if (m + kAhead < M && slot[m + kAhead] >= 0) __builtin_prefetch(cell + 2 * cell_of(m + kAhead));
    const int32_t s = slot[m];
    if (s < 0 || s >= S) {
      entry[m] = 0;
      continue;
    }
    const int32_t key = int32_t(s * R + local[m]);
    uint32_t h = Fmix32(uint32_t(key)) & mask;
    while (cell[2 * h] != key && cell[2 * h] != -1) h = (h + 1) & mask;
    if (cell[2 * h] == -1) {  // a new key: the next place of its owner's bucket
      cell[2 * h] = key;
      hash.used.push_back(h);
      const int32_t rank = count[s]++;
      int32_t place = 0;
      if (rank < C) {
        place = int32_t(s * C + rank);
        ask[place] = local[m];
        first[place] = int32_t(m);
      }
      cell[2 * h + 1] = place;
    }
    entry[m] = cell[2 * h + 1];
  }
  for (const uint32_t h : hash.used) cell[2 * h] = -1;
}

ffi::Error RouteImpl(ffi::Buffer<ffi::S32> slot, ffi::Buffer<ffi::S32> local,
                     ffi::ResultBuffer<ffi::S32> ask, ffi::ResultBuffer<ffi::S32> entry,
                     ffi::ResultBuffer<ffi::S32> first, ffi::ResultBuffer<ffi::S32> count,
                     int64_t rows) {
  const int64_t M = int64_t(slot.element_count());
  auto ad = ask->dimensions();
  if (ad.size() != 2 || local.element_count() != size_t(M) ||
      entry->element_count() != size_t(M) || first->element_count() != size_t(ad[0] * ad[1]) ||
      count->element_count() != size_t(ad[0])) {
    return Invalid("lf_jax route: expected slot, local, entry [M], ask, first [S, C], count [S]");
  }
  const int64_t S = ad[0], C = ad[1];
  if (S * (rows + 1) >= (int64_t(1) << 31) || S * C >= (int64_t(1) << 31) ||
      M >= (int64_t(1) << 30)) {
    return Invalid("lf_jax route: keys, places or entries exceed int32");
  }
  Lease<HashTable> hash;
  Route(slot.typed_data(), local.typed_data(), M, S, C, rows, ask->typed_data(),
        entry->typed_data(), first->typed_data(), count->typed_data(), *hash);
  return ffi::Error::Success();
}

// Whether a call's entries and places (int32 in the kernels' index arrays) fit int32.
bool FitInt32(int64_t entries, int64_t places) {
  return entries < (int64_t(1) << 31) && places < (int64_t(1) << 31);
}

// The output blocks of a call with S results [C, D] or one result [S, C, D].
ffi::ErrorOr<std::vector<float*>> Blocks(ffi::RemainingRets& out, int64_t S, int64_t C,
                                         int64_t D) {
  std::vector<float*> blocks(S);
  if (out.size() == 1) {
    auto one = out.get<ffi::Buffer<ffi::F32>>(0);
    if (!one.has_value() || (*one)->element_count() != size_t(S * C * D)) {
      return ffi::Unexpected(Invalid("lf_jax route: expected one [S, C, D] float32 result"));
    }
    for (int64_t s = 0; s < S; ++s) blocks[s] = (*one)->typed_data() + s * C * D;
    return blocks;
  }
  if (int64_t(out.size()) != S) {
    return ffi::Unexpected(Invalid("lf_jax route: expected S [C, D] results or one [S, C, D]"));
  }
  for (int64_t s = 0; s < S; ++s) {
    auto block = out.get<ffi::Buffer<ffi::F32>>(s);
    if (!block.has_value() || (*block)->element_count() != size_t(C * D)) {
      return ffi::Unexpected(Invalid("lf_jax route: expected [C, D] float32 results"));
    }
    blocks[s] = (*block)->typed_data();
  }
  return blocks;
}

// dst = src * x and dst += src * x over kD floats (D where kD is 0: a template argument
// for the common D = 64 unrolls the loop): the kernels' expressions (one multiply; a
// multiply-add), dst never aliasing src.
template <int64_t kD>
void Scale(float* __restrict dst, const float* __restrict src, float x, int64_t D) {
  for (int64_t d = 0; d < (kD ? kD : D); ++d) dst[d] = src[d] * x;
}

template <int64_t kD>
void AddScaled(float* __restrict dst, const float* __restrict src, float x, int64_t D) {
  for (int64_t d = 0; d < (kD ? kD : D); ++d) dst[d] += src[d] * x;
}

// One pass over the entries, n and e nested (no m / E per entry); place p's row in the
// S blocks is blocks[p / C] + (p % C) * D, by a multiply (DivBy), not a divide. A place
// with a first entry is written when the pass reaches it (an entry before it: false,
// nothing summed), the others were zero-filled first. Returns false on an entry that
// precedes its place's first.
template <int64_t kD>
bool SumPlaces(const int32_t* places, const int32_t* firsts, const float* w, const int32_t* cols,
               const float* g, int64_t N, int64_t E, int64_t K, int64_t D, int64_t S, int64_t C,
               const std::vector<float*>& blocks) {
  const int64_t M = N * E, SC = S * C;
  const DivBy by_c(C);
  for (int64_t s = 0; s < S; ++s) {  // the places no first entry writes start from 0
    for (int64_t c = 0; c < C; ++c) {
      const int64_t m = firsts[s * C + c];
      if (m < 0 || m >= M) std::memset(blocks[s] + c * D, 0, sizeof(float) * D);
    }
  }
  for (int64_t n = 0, m = 0; n < N; ++n) {
    const float* g_n = g + n * K * D;
    for (int64_t e = 0; e < E; ++e, ++m) {
      const int64_t p = places[m];
      if (uint64_t(p) >= uint64_t(SC)) continue;
      const int64_t s = by_c.Of(p), first = firsts[p];
      float* dst = blocks[s] + (p - s * C) * D;
      if (first == m) {
        Scale<kD>(dst, g_n + cols[e] * D, w[m], D);
      } else if (first < m || first >= M) {
        AddScaled<kD>(dst, g_n + cols[e] * D, w[m], D);
      } else {
        return false;
      }
    }
  }
  return true;
}

ffi::Error SumPlacesImpl(ffi::Buffer<ffi::S32> place, ffi::Buffer<ffi::S32> first,
                         ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::S32> out_col,
                         ffi::Buffer<ffi::F32> grad, ffi::RemainingRets out) {
  auto pd = place.dimensions();
  auto fd = first.dimensions();
  auto gd = grad.dimensions();
  if (pd.size() != 2 || fd.size() != 2 || gd.size() != 3 ||
      coef.element_count() != place.element_count() || out_col.element_count() != size_t(pd[1]) || gd[0] != pd[0]) {
    return Invalid("lf_jax sum_places: expected place, coef [N, E], first [S, C], grad [N, C, D]");
  }
  const int64_t N = pd[0], E = pd[1], S = fd[0], C = fd[1], K = gd[1], D = gd[2];
  if (!FitInt32(N * E, S * C)) {
    return Invalid("lf_jax sum_places: entries or places exceed int32");
  }
  auto blocks = Blocks(out, S, C, D);
  if (!blocks.has_value()) return blocks.error();
  auto run = D == 64 ? SumPlaces<64> : SumPlaces<0>;
  if (!run(place.typed_data(), first.typed_data(), coef.typed_data(), out_col.typed_data(),
           grad.typed_data(), N, E, K, D, S, C, *blocks)) {
    return Invalid("lf_jax sum_places: an entry precedes its place's first entry");
  }
  return ffi::Error::Success();
}

template <class Ty, int64_t kD>
void GatherRows(const typename Ty::T* table, int64_t R, int64_t D, const int32_t* asked, int64_t S,
            int64_t C, const std::vector<float*>& blocks) {
  constexpr int64_t kAhead = 8;  // rows to prefetch ahead: the asked rows are random reads
  constexpr int64_t kLine = 64 / sizeof(typename Ty::T);
  const int64_t total = S * C;
  for (int64_t s = 0, k = 0; s < S; ++s) {
    float* dst = blocks[s];
    for (int64_t c = 0; c < C; ++c, ++k, dst += D) {
      if (k + kAhead < total) {
        const int64_t ahead = asked[k + kAhead];
        if (ahead >= 0 && ahead < R) {
          for (int64_t d = 0; d < D; d += kLine) __builtin_prefetch(table + ahead * D + d);
        }
      }
      const int64_t r = asked[k];
      if (r < 0 || r >= R) {
        std::memset(dst, 0, sizeof(float) * D);
        continue;
      }
      const typename Ty::T* __restrict src = table + r * D;
      float* __restrict out = dst;
      for (int64_t d = 0; d < (kD ? kD : D); ++d) out[d] = Ty::load(src[d]);
    }
  }
}

template <class Ty>
void Gather(const typename Ty::T* table, int64_t R, int64_t D, const int32_t* asked, int64_t S,
            int64_t C, const std::vector<float*>& blocks) {
  (D == 64 ? GatherRows<Ty, 64> : GatherRows<Ty, 0>)(table, R, D, asked, S, C, blocks);
}

ffi::Error GatherAskedImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> asked,
                           ffi::RemainingRets out) {
  auto td = table.dimensions();
  auto ad = asked.dimensions();
  if (td.size() < 2 || ad.size() != 2) {
    return Invalid("lf_jax gather_asked: expected table [..., R, D], asked [S, C]");
  }
  const int64_t D = td[td.size() - 1], R = int64_t(table.element_count()) / D;
  const int64_t S = ad[0], C = ad[1];
  auto blocks = Blocks(out, S, C, D);
  if (!blocks.has_value()) return blocks.error();
  const void* data = table.untyped_data();
  const int32_t* a = asked.typed_data();
  switch (table.element_type()) {
    case ffi::DataType::F32:
      Gather<F32>(static_cast<const float*>(data), R, D, a, S, C, *blocks);
      break;
    case ffi::DataType::BF16:
      Gather<BF16>(static_cast<const uint16_t*>(data), R, D, a, S, C, *blocks);
      break;
    case ffi::DataType::F16:
      Gather<F16>(static_cast<const _Float16*>(data), R, D, a, S, C, *blocks);
      break;
    default:
      return Invalid("lf_jax gather_asked: table dtype must be float32, bfloat16 or float16");
  }
  return ffi::Error::Success();
}

template <int64_t kD>
void PoolParts(const int32_t* p, const float* w, const int32_t* cols, int64_t N, int64_t E,
               int64_t K, int64_t D, int64_t C, const std::vector<const float*>& blocks,
               float* o) {
  const int64_t last = int64_t(blocks.size()) * C - 1, total = N * E;
  const DivBy by_c(C);
  auto row = [&](int64_t r) {
    const int64_t s = by_c.Of(r);
    return blocks[s] + (r - s * C) * D;
  };
  constexpr int64_t kAhead = 16;
  std::memset(o, 0, sizeof(float) * N * K * D);
  for (int64_t n = 0, m = 0; n < N; ++n) {
    float* o_n = o + n * K * D;
    for (int64_t e = 0; e < E; ++e, ++m) {
      if (m + kAhead < total && p[m + kAhead] >= 0) {
        const float* ahead = row(std::min<int64_t>(p[m + kAhead], last));
        for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(ahead + d);
      }
      const int64_t r = p[m];
      if (r < 0) continue;
      AddScaled<kD>(o_n + cols[e] * D, row(std::min(r, last)), w[m], D);
    }
  }
}

ffi::Error PoolPartsImpl(ffi::Buffer<ffi::S32> place, ffi::Buffer<ffi::F32> coef,
                         ffi::Buffer<ffi::S32> out_col, ffi::RemainingArgs parts,
                         ffi::ResultBuffer<ffi::F32> out) {
  auto pd = place.dimensions();
  auto od = out->dimensions();
  if (pd.size() != 2 || od.size() != 3 || od[0] != pd[0] ||
      coef.element_count() != place.element_count() || out_col.element_count() != size_t(pd[1]) ||
      parts.size() == 0) {
    return Invalid("lf_jax pool_parts: expected place, coef [N, E], out [N, K, D], S blocks");
  }
  const int64_t N = pd[0], E = pd[1], K = od[1], D = od[2], S = int64_t(parts.size());
  std::vector<const float*> blocks(S);
  int64_t C = -1;
  for (int64_t s = 0; s < S; ++s) {
    auto block = parts.get<ffi::Buffer<ffi::F32>>(s);
    if (!block.has_value()) return block.error();
    const int64_t rows = int64_t(block->element_count()) / D;
    if (C >= 0 && rows != C) return Invalid("lf_jax pool_parts: blocks of unequal rows");
    C = rows;
    blocks[s] = block->typed_data();
  }
  if (C < 1) return Invalid("lf_jax pool_parts: empty blocks");
  if (!FitInt32(N * E, S * C)) {
    return Invalid("lf_jax pool_parts: entries or rows exceed int32");
  }
  (D == 64 ? PoolParts<64> : PoolParts<0>)(place.typed_data(), coef.typed_data(),
                                           out_col.typed_data(), N, E, K, D, C, blocks,
                                           out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfRoute, RouteImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfSumPlaces, SumPlacesImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfGatherAsked, GatherAskedImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfPoolParts, PoolPartsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>());
