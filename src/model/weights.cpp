#include "model/weights.hpp"

#include <fmt/format.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include "common/error.hpp"

namespace nanscope {

WeightView WeightSource::matrix(const std::string& module, int64_t rows, int64_t cols) {
  return view(get(module + ".weight", {rows, cols}));
}

WeightView WeightSource::rows_of(const WeightView& w, int64_t r0, int64_t rows) const {
  WeightView v = w;
  v.data = w.data + size_t(r0 * w.cols) * size_t(dtype_bits(w.storage) / 8);
  v.rows = rows;
  return v;
}

Activations WeightSource::vector(const std::string& module, const char* param, int64_t n) {
  if (module.empty()) return {};
  const TensorRef t = get(module + "." + param, {n});
  Activations out(static_cast<size_t>(n));
  weight_vector(bytes_of(t), t.info->dtype, n, dt_, out.data());
  return out;
}

LayerWeights WeightSource::layer(const LayerSpec& s, int64_t H) {
  const LayerNames& n = s.names;
  const AttentionSpec& a = s.attn;
  const int64_t D = a.head_dim, qd = a.heads * D, kvd = a.kv_heads * D;
  LayerWeights w;
  w.input_norm = vector(n.input_norm, "weight", H);
  if (a.fused_qkv) {
    const WeightView qkv = matrix(n.qkv_proj, qd + 2 * kvd, H);
    w.qkv = qkv;
    w.q = rows_of(qkv, 0, qd), w.k = rows_of(qkv, qd, kvd), w.v = rows_of(qkv, qd + kvd, kvd);
  } else {
    w.q = matrix(n.q_proj, qd, H), w.k = matrix(n.k_proj, kvd, H), w.v = matrix(n.v_proj, kvd, H);
  }
  if (a.qkv_bias) {
    w.q_bias = vector(n.q_proj, "bias", qd);
    w.k_bias = vector(n.k_proj, "bias", kvd);
    w.v_bias = vector(n.v_proj, "bias", kvd);
  }
  if (a.qk_norm) w.q_norm = vector(n.q_norm, "weight", D), w.k_norm = vector(n.k_norm, "weight", D);
  w.o = matrix(n.o_proj, H, qd);
  if (a.o_bias) w.o_bias = vector(n.o_proj, "bias", H);
  w.attn_out_norm = vector(n.attn_out_norm, "weight", H);
  w.mlp_in_norm = vector(n.mlp_in_norm, "weight", H);
  w.mlp_out_norm = vector(n.mlp_out_norm, "weight", H);
  const MlpSpec& m = s.mlp;
  const int64_t I = m.intermediate;
  if (!m.moe) {
    if (m.fused_gate_up) {
      const WeightView gu = matrix(n.gate_up_proj, 2 * I, H);
      w.gate_up = gu;
      w.gate = rows_of(gu, 0, I), w.up = rows_of(gu, I, I);
    } else {
      w.gate = matrix(n.gate_proj, I, H), w.up = matrix(n.up_proj, I, H);
    }
    w.down = matrix(n.down_proj, H, I);
    if (m.bias) {
      w.gate_bias = vector(n.gate_proj, "bias", I);
      w.up_bias = vector(n.up_proj, "bias", I);
      w.down_bias = vector(n.down_proj, "bias", H);
    }
  } else {
    w.router = matrix(n.router, m.experts, H);
    if (m.shared_intermediate > 0) {
      const int64_t S = m.shared_intermediate;
      w.shared_gate = matrix(n.shared_gate_proj, S, H);
      w.shared_up = matrix(n.shared_up_proj, S, H);
      w.shared_down = matrix(n.shared_down_proj, H, S);
      w.shared_expert_gate = matrix(n.shared_expert_gate, 1, H);
    }
  }
  return w;
}

void WeightSource::release_all() {
  if (release_)
    for (const TensorRef& t : held_) t.release();
  held_.clear();
}

TensorRef WeightSource::get(const std::string& name, std::initializer_list<int64_t> shape) {
  const std::optional<TensorRef> swapped = adapter_ ? adapter_->replacement(name) : std::nullopt;
  const TensorRef t = swapped ? *swapped : ck_.get(name);
  if (!is_float_computable(t.info->dtype))
    fail("{}: tensor {} has dtype {}; the forward pass reads F32, BF16 or F16", ck_.dir().string(),
         name, dtype_name(t.info->dtype));
  if (!std::equal(shape.begin(), shape.end(), t.info->shape.begin(), t.info->shape.end()))
    fail("{}: tensor {} has shape [{}], expected [{}] from config.json", ck_.dir().string(), name,
         fmt::join(t.info->shape, ", "), fmt::join(shape, ", "));
  held_.push_back(t);
  if (counted_.insert(t.info).second) bytes_ += t.bytes().size();
  return t;
}

const std::byte* WeightSource::bytes_of(const TensorRef& t) {
  return resident_ ? resident_->get(t) : t.bytes().data();
}

WeightView WeightSource::view(const TensorRef& t) {
  const auto& s = t.info->shape;
  return WeightView{bytes_of(t), t.info->dtype, s[0], s[1]};
}

ResidentWeights::~ResidentWeights() {
  for (auto& [info, b] : bufs_) {
    if (b.huge)
      munmap(b.data, b.size);
    else
      std::free(b.data);
  }
}

const std::byte* ResidentWeights::get(const TensorRef& t) {
  const std::lock_guard<std::mutex> lock(mu_);
  auto [it, fresh] = bufs_.try_emplace(t.info);
  Buffer& b = it->second;
  if (!fresh) return b.data;
  const std::span<const std::byte> src = t.bytes();
  constexpr size_t kHuge = size_t(2) << 20;
  if (src.size() >= kHuge / 2) {  // whole 2 MiB pages: one TLB entry each
    b.size = (src.size() + kHuge - 1) / kHuge * kHuge;
    void* p = mmap(nullptr, b.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      throw std::bad_alloc();
    madvise(p, b.size, MADV_HUGEPAGE);  // a hint; without THP the copy still works
    b.data = static_cast<std::byte*>(p);
    b.huge = true;
  } else {
    b.size = src.size();
    b.data = static_cast<std::byte*>(std::malloc(std::max<size_t>(b.size, 1)));
    if (!b.data) throw std::bad_alloc();
  }
  std::memcpy(b.data, src.data(), src.size());
  bytes_ += src.size();
  return b.data;
}

}  // namespace nanscope
