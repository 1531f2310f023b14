// `--device` for every command that runs the model, whether or not this build has CUDA.
#include "common/error.hpp"
#include "cuda/forward_cuda.hpp"

namespace nanscope {

Device parse_device_flag(std::string_view value) {
  const std::optional<Device> d = parse_device(value);
  if (!d) fail("--device {}: expected cpu or cuda", value);
  if (*d == Device::Cuda && !cuda_built())
    fail(
        "--device cuda: this nanscope was built without the CUDA backend; rebuild it on a "
        "machine with the CUDA toolkit (nvcc, cuBLAS): cmake -DNANSCOPE_CUDA=ON (docs/cuda.md)");
  return *d;
}

}  // namespace nanscope
