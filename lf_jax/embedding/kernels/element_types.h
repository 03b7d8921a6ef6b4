// Element types of the tables the fused CPU kernels read and write (included by the
// kernels' .cc files; build.py keys the cached library by this header too). Each type
// converts to and from float: bfloat16 as its bits, stores rounded to nearest even as
// XLA converts; float16 as the compiler's _Float16.
#ifndef LF_JAX_KERNELS_ELEMENT_TYPES_H_
#define LF_JAX_KERNELS_ELEMENT_TYPES_H_

#include <cmath>
#include <cstdint>
#include <cstring>

namespace lf_jax_kernels {

struct F32 {
  using T = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};

struct BF16 {
  using T = uint16_t;
  static float load(uint16_t x) {
    uint32_t bits = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  static uint16_t store(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if (std::isnan(f)) return uint16_t((bits >> 16) | 0x40);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return uint16_t(bits >> 16);
  }
};

struct F16 {
  using T = _Float16;
  static float load(_Float16 x) { return float(x); }
  static _Float16 store(float f) { return _Float16(f); }
};

}  // namespace lf_jax_kernels

#endif  // LF_JAX_KERNELS_ELEMENT_TYPES_H_
