// forward_cuda without the CUDA toolkit (NANSCOPE_CUDA=OFF): `--device cuda` is an input error
// that says how to build the backend.
#include "common/error.hpp"
#include "cuda/forward_cuda.hpp"

namespace nanscope {

bool cuda_built() {
  return false;
}

bool cuda_gathers_embeddings(const ModelSpec&, const ForwardOptions&) {
  return false;
}

CudaPass forward_cuda(const Checkpoint&, const ModelSpec&, std::span<const int64_t>,
                      std::span<const float>, const ForwardOptions&, Observer*, bool,
                      std::span<const int64_t>) {
  fail(
      "--device cuda: this nanscope was built without the CUDA backend; rebuild it on a machine "
      "with the CUDA toolkit (nvcc, cuBLAS): cmake -DNANSCOPE_CUDA=ON (docs/cuda.md)");
}

CudaStep forward_cuda_step(const Checkpoint&, std::span<const int64_t>, KvCache&,
                           const ForwardOptions&) {
  fail(
      "--device cuda: this nanscope was built without the CUDA backend; rebuild it on a machine "
      "with the CUDA toolkit (nvcc, cuBLAS): cmake -DNANSCOPE_CUDA=ON (docs/cuda.md)");
}

std::vector<float> cuda_matvec(std::span<const float>, std::span<const float>, int64_t, int64_t,
                               DType, bool) {
  fail("cuda_matvec: this nanscope was built without the CUDA backend");
}

}  // namespace nanscope
