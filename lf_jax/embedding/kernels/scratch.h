// Pieces the fused CPU kernels share (included by the kernels' .cc files; build.py keys
// the cached library by this header too): the error of a bad argument, the hash that
// spreads keys over open-addressing cells, and a pool of per-call scratch memory.
//
// Scratch: the calls of several simulated devices run at once on XLA's threads, so each
// call leases its own scratch object from a pool and hands it back when it returns; a
// fresh one per call would be page-faulted in again every step.
//
//   Lease<Scratch> lease;      // taken from Pool<Scratch>, returned on destruction
//   Scratch& s = *lease;
#ifndef LF_JAX_KERNELS_SCRATCH_H_
#define LF_JAX_KERNELS_SCRATCH_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace lf_jax_kernels {

inline xla::ffi::Error Invalid(const char* what) {
  return xla::ffi::Error(xla::ffi::ErrorCode::kInvalidArgument, what);
}

// murmur3's 32-bit finalizer
inline uint32_t Fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// The free scratch objects of type T (never destroyed: XLA may call a kernel at exit).
template <class T>
class Pool {
 public:
  static Pool& Get() {
    static Pool* pool = new Pool();
    return *pool;
  }
  std::unique_ptr<T> Take() {
    std::lock_guard<std::mutex> hold(lock_);
    if (free_.empty()) return std::make_unique<T>();
    auto taken = std::move(free_.back());
    free_.pop_back();
    return taken;
  }
  void Give(std::unique_ptr<T> given) {
    std::lock_guard<std::mutex> hold(lock_);
    free_.push_back(std::move(given));
  }

 private:
  std::mutex lock_;
  std::vector<std::unique_ptr<T>> free_;
};

// A T from Pool<T> for the lifetime of the lease.
template <class T>
class Lease {
 public:
  Lease() : held_(Pool<T>::Get().Take()) {}
  ~Lease() { Pool<T>::Get().Give(std::move(held_)); }
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  T& operator*() const { return *held_; }

 private:
  std::unique_ptr<T> held_;
};

}  // namespace lf_jax_kernels

#endif  // LF_JAX_KERNELS_SCRATCH_H_
