// Reading transformers' goldens (safetensors of hidden states, logits, input ids) and comparing
// nanscope's tensors with them: shared by the forward, adapter and generation tests.
#pragma once

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "formats/safetensors.hpp"
#include "numerics/dtype.hpp"

namespace nanscope {

struct Golden {
  std::shared_ptr<SafetensorsFile> file;
  std::vector<float> get(const std::string& name) const {
    const TensorInfo* t = file->find(name);
    if (!t) return {};
    std::vector<float> v(size_t(t->numel()));
    load_to_f32(file->data(*t).data(), t->dtype, v.data(), v.size());
    return v;
  }
  std::vector<int64_t> ids() const {
    const TensorInfo* t = file->find("input_ids");
    std::vector<int64_t> v(size_t(t->numel()));
    std::memcpy(v.data(), file->data(*t).data(), v.size() * 8);
    return v;
  }
  bool has(const std::string& name) const { return file->find(name) != nullptr; }
};

// Comparison of one tensor against its golden.
struct Cmp {
  int64_t n = 0, pattern_mismatch = 0, bit_identical = 0;
  double rel = 0;  // ||a - b|| / ||b|| over elements finite in both
};

inline Cmp compare(const std::vector<float>& ours, const std::vector<float>& gold) {
  Cmp c;
  c.n = int64_t(gold.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < gold.size(); ++i) {
    const float a = ours[i], b = gold[i];
    const bool fa = std::isfinite(a), fb = std::isfinite(b);
    if (fa != fb || (!fa && std::isnan(a) != std::isnan(b))) ++c.pattern_mismatch;
    if (std::memcmp(&a, &b, 4) == 0 || (std::isnan(a) && std::isnan(b))) ++c.bit_identical;
    if (fa && fb) {
      num += (double(a) - b) * (double(a) - b);
      den += double(b) * b;
    }
  }
  c.rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return c;
}

inline DType dtype_of(const std::string& s) {
  return s == "float32" ? DType::F32 : s == "bfloat16" ? DType::BF16 : DType::F16;
}

}  // namespace nanscope
