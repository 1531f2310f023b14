// The reference forward pass: the computation of forward() (model/forward.hpp) for one
// sequence, written as a plain single-threaded recipe from the scalar `_ref` kernels, with
// attention as explicit loops. It names every site and hidden state as forward() does, with the
// same shapes, so that the fast path can be tested against it site by site
// (tests/unit/test_reference.cpp; docs/forward.md, "The reference pass").
//
// Same rounding points as forward(); where the fast path reproduces a bit-level detail of a
// torch kernel (SLEEF's exp in the softmax, the flash kernel's fexp_u20 and lane sums, BLAS or
// AMX accumulation orders), the reference computes the plain formula in fp32 instead: the two
// agree within the rounding noise of the run dtype, not bit for bit.
#pragma once

#include <cstdint>
#include <span>

#include "formats/checkpoint.hpp"
#include "model/forward.hpp"
#include "model/observer.hpp"

namespace nanscope {

// Slow (scalar, one thread): meant for tiny models and tests. Throws InputError as forward().
ForwardResult forward_reference(const Checkpoint& ck, std::span<const int64_t> ids,
                                const ForwardOptions& opt, Observer* obs = nullptr);

}  // namespace nanscope
