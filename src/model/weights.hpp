// One decoder layer's weights as the forward pass reads them, and where they come from: the
// mapped checkpoint, each tensor checked against the shape the layer description
// (model/arch.hpp) gives. Shared by the fast forward pass (forward.cpp) and the reference one
// (reference.cpp), so that both read exactly the same numbers.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "formats/checkpoint.hpp"
#include "model/adapter_overlay.hpp"
#include "model/arch.hpp"
#include "numerics/activations.hpp"
#include "numerics/dtype.hpp"
#include "numerics/kernels.hpp"

namespace nanscope {

// One layer's weights, one member per weight, as the run dtype reads them: matrices in place
// in the mapped checkpoint (q/k/v and gate/up may be row ranges of a fused tensor), norms and
// biases converted. Experts are not here: a mixture-of-experts block reads only the experts its
// tokens route to (forward.cpp: Model::moe).
struct LayerWeights {
  Activations input_norm, attn_out_norm, mlp_in_norm, mlp_out_norm, q_norm, k_norm;
  WeightView q, k, v, o;
  WeightView qkv, gate_up;  // the whole fused tensors where q/k/v, gate/up are row ranges
  Activations q_bias, k_bias, v_bias, o_bias;
  WeightView gate, up, down;
  Activations gate_bias, up_bias, down_bias;
  WeightView router, shared_gate, shared_up, shared_down, shared_expert_gate;
};

// Weights copied once into memory of their own and kept across passes (generate: every step
// reads every weight again). From the page cache each pass pays a TLB miss per 4 KiB page and
// the mapping's bookkeeping; large tensors here sit on 2 MiB pages where the kernel gives them.
class ResidentWeights {
 public:
  ResidentWeights() = default;
  ResidentWeights(const ResidentWeights&) = delete;
  ResidentWeights& operator=(const ResidentWeights&) = delete;
  ~ResidentWeights();
  // The tensor's bytes, copied on first use (thread-safe).
  const std::byte* get(const TensorRef& t);
  uint64_t bytes() const { return bytes_; }

 private:
  struct Buffer {
    std::byte* data = nullptr;
    size_t size = 0;
    bool huge = false;
  };
  std::mutex mu_;
  std::map<const TensorInfo*, Buffer> bufs_;
  uint64_t bytes_ = 0;
};

// Where weights come from: the mapped checkpoint, checked against the shapes the layer
// description gives, each layer's pages handed back once it is done. The seam a device
// backend's uploader takes the place of.
class WeightSource {
 public:
  // `adapter` (nullable): its modules_to_save / bias tensors are read instead of the base's.
  // `resident` (nullable): weights are read from copies kept there instead of the mapping.
  WeightSource(const Checkpoint& ck, DType dt, bool release,
               const AdapterOverlay* adapter = nullptr, ResidentWeights* resident = nullptr)
      : ck_(ck), dt_(dt), release_(release), adapter_(adapter), resident_(resident) {}
  ~WeightSource() { release_all(); }
  WeightSource(const WeightSource&) = delete;
  WeightSource& operator=(const WeightSource&) = delete;

  WeightView matrix(const std::string& module, int64_t rows, int64_t cols);
  // Rows [r0, r0 + rows) of a fused [total, cols] matrix.
  WeightView rows_of(const WeightView& w, int64_t r0, int64_t rows) const;
  Activations vector(const std::string& module, const char* param, int64_t n);
  LayerWeights layer(const LayerSpec& s, int64_t H);
  uint64_t bytes_read() const { return bytes_; }  // each tensor counted once
  // Hands back the pages of everything taken since the last call.
  void release_all();

 private:
  TensorRef get(const std::string& name, std::initializer_list<int64_t> shape);
  WeightView view(const TensorRef& t);
  const std::byte* bytes_of(const TensorRef& t);

  const Checkpoint& ck_;
  DType dt_;
  bool release_;
  const AdapterOverlay* adapter_;
  ResidentWeights* resident_;
  std::vector<TensorRef> held_;
  std::set<const TensorInfo*> counted_;
  uint64_t bytes_ = 0;
};

}  // namespace nanscope
