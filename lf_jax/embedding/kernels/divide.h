// Division by a divisor fixed for a kernel call, without a divide instruction per entry
// (included by the kernels' .cc files; build.py keys the cached library by this header
// too). The kernels' per-entry loops split flat indices (a place p into its block p / C
// and row p % C): a 64-bit idiv took ~9% of the sums' time in the 8-device step.
//
// DivBy(d).Of(n) == n / d for every n in [0, 2^32) and d in [1, 2^32): one 64 x 64 -> 128
// bit multiply (Lemire, Kaser & Kurz 2019, "Faster remainder by direct computation":
// M = floor((2^64 - 1) / d) + 1 is exact for 32-bit numerators; d = 1 returns n).
#ifndef LF_JAX_KERNELS_DIVIDE_H_
#define LF_JAX_KERNELS_DIVIDE_H_

#include <cstdint>

namespace lf_jax_kernels {

class DivBy {
 public:
  explicit DivBy(int64_t d) : d_(uint32_t(d)), magic_(d > 1 ? ~uint64_t(0) / uint64_t(d) + 1 : 0) {}
  int64_t Of(int64_t n) const {
    return d_ == 1 ? n : int64_t((__uint128_t(magic_) * uint32_t(n)) >> 64);
  }

 private:
  uint32_t d_;
  uint64_t magic_;
};

}  // namespace lf_jax_kernels

#endif  // LF_JAX_KERNELS_DIVIDE_H_
