// The activation arrays of the forward pass (and the bf16 copies made for oneDNN):
// std::vector with an allocator that (1)
// leaves elements uninitialised, since every kernel writes its whole output, and (2) keeps
// large freed blocks for the next request of the same size. Each layer allocates the same
// shapes again; glibc serves blocks above 32 MB with fresh mmap calls whose pages the kernel
// must fault in and zero on first touch, and value-initialising them zeroes them once more on
// one thread. For a batch of 4096 tokens of a 4B model that is about ten 40-160 MB arrays per
// layer.
#pragma once

#include <cstddef>
#include <new>
#include <utility>
#include <vector>

namespace nanscope {

namespace activation_cache {
void* acquire(size_t bytes);          // a kept block of exactly this size, or a new one
void release(void* p, size_t bytes);  // keeps large blocks (up to a bound), frees the rest
void trim();                          // frees every kept block (end of a forward pass)
}  // namespace activation_cache

template <typename T>
struct ActivationAllocator {
  using value_type = T;
  ActivationAllocator() = default;
  template <typename U>
  ActivationAllocator(const ActivationAllocator<U>&) noexcept {}
  T* allocate(size_t n) { return static_cast<T*>(activation_cache::acquire(n * sizeof(T))); }
  void deallocate(T* p, size_t n) noexcept { activation_cache::release(p, n * sizeof(T)); }
  // Default-initialise (no zeroing) when no value is given.
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... A>
  void construct(U* p, A&&... a) {
    ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
  template <typename U>
  bool operator==(const ActivationAllocator<U>&) const noexcept {
    return true;
  }
};

using Activations = std::vector<float, ActivationAllocator<float>>;

}  // namespace nanscope
