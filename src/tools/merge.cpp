#include "tools/merge.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include "common/error.hpp"
#include "formats/adapter.hpp"
#include "formats/checkpoint.hpp"
#include "formats/safetensors.hpp"

namespace nanscope {

namespace fs = std::filesystem;

std::atomic<bool>& merge_interrupt_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

std::string dtype_cli_name(DType t) {
  switch (t) {
    case DType::BF16:
      return "bf16";
    case DType::F16:
      return "fp16";
    case DType::F32:
      return "fp32";
    default:
      return std::string(dtype_name(t));
  }
}

std::optional<DType> parse_merge_dtype(const std::string& s) {
  if (s == "auto") return std::nullopt;
  if (s == "bf16" || s == "bfloat16") return DType::BF16;
  if (s == "fp16" || s == "float16" || s == "f16") return DType::F16;
  if (s == "fp32" || s == "float32" || s == "f32") return DType::F32;
  fail("merge: --dtype {} is not one of auto, bf16, fp16, fp32", s);
}

namespace {

constexpr std::string_view kPeftPrefix = "base_model.model.";
constexpr const char* kEmbed = "model.embed_tokens.weight";
constexpr const char* kLmHead = "lm_head.weight";

bool ends_with(std::string_view s, std::string_view suf) {
  return s.size() >= suf.size() && s.substr(s.size() - suf.size()) == suf;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

// ---- the adapter, sorted by what each tensor does ----------------------------------------------

struct LoraModule {
  std::string module;                // module path in the model: "model.layers.0.self_attn.q_proj"
  const TensorInfo* A = nullptr;     // lora_A.weight [r, in] | lora_embedding_A [r, V]
  const TensorInfo* B = nullptr;     // lora_B.weight [out, r] | lora_embedding_B [H, r]
  const TensorInfo* bias = nullptr;  // lora_B.bias [out] (lora_bias)
  const TensorInfo* magnitude = nullptr;  // DoRA: [out] (linear) | [H] (embedding)
  bool embedding = false;
  LoraScale scale{};
};

struct TokenRows {
  const TensorInfo* values = nullptr;  // [n, H]
  std::vector<int64_t> rows;
};

struct AdapterPlan {
  std::map<std::string, LoraModule> lora;             // by module path
  std::map<std::string, const TensorInfo*> replace;   // base tensor name -> full values
  std::map<std::string, TokenRows> token_rows;        // base tensor name -> rows
  std::map<std::string, uint64_t> adapter_nonfinite;  // adapter tensor -> NaN/inf count
};

uint64_t count_nonfinite(std::span<const std::byte> bytes, DType t, uint64_t n) {
  uint64_t bad = 0;
  if (t == DType::F32) {
    for (uint64_t i = 0; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, bytes.data() + 4 * i, 4);
      bad += (u & 0x7f800000u) == 0x7f800000u;
    }
  } else if (t == DType::BF16 || t == DType::F16) {
    const uint16_t exp = t == DType::BF16 ? 0x7f80u : 0x7c00u;
    for (uint64_t i = 0; i < n; ++i) {
      uint16_t u;
      std::memcpy(&u, bytes.data() + 2 * i, 2);
      bad += (u & exp) == exp;
    }
  }
  return bad;
}

std::vector<float> load_all_f32(const SafetensorsFile& f, const TensorInfo& t) {
  std::vector<float> v(t.numel());
  load_to_f32(f.data(t).data(), t.dtype, v.data(), v.size());
  return v;
}

AdapterPlan plan_adapter(const Adapter& ad, const Checkpoint& base, bool base_tied) {
  AdapterPlan p;
  const AdapterConfig& cfg = ad.config();
  const std::string file = (ad.dir() / "adapter_model.safetensors").string();
  auto base_has = [&](const std::string& name) {
    return base.find(name).has_value() || (base_tied && name == kLmHead);
  };
  auto base_shape = [&](const std::string& name) {
    auto r = base.find(name == kLmHead && base_tied ? std::string(kEmbed) : name);
    return r->info->shape;
  };
  for (const TensorInfo& t : ad.file().tensors()) {
    const std::string& key = t.name;
    if (!is_float_computable(t.dtype))
      fail("{}: adapter tensor {} has dtype {}; a LoRA adapter holds bf16/fp16/fp32 tensors", file,
           key, dtype_name(t.dtype));
    if (key.rfind(kPeftPrefix, 0) != 0)
      fail(
          "{}: adapter tensor {} does not start with `{}` (not saved by peft's "
          "save_pretrained?)",
          file, key, kPeftPrefix);
    uint64_t bad = count_nonfinite(ad.file().data(t), t.dtype, t.numel());
    if (bad) p.adapter_nonfinite[key] = bad;
    const std::string rest = key.substr(kPeftPrefix.size());
    struct Suffix {
      const char* s;
      int role;  // 0 A, 1 B, 2 bias, 3 embA, 4 embB, 5 magnitude, 6 token rows
    };
    static const Suffix suffixes[] = {{".lora_A.weight", 0},
                                      {".lora_B.weight", 1},
                                      {".lora_B.bias", 2},
                                      {".lora_embedding_A", 3},
                                      {".lora_embedding_B", 4},
                                      {".lora_magnitude_vector", 5},
                                      {".token_adapter.trainable_tokens_delta", 6}};
    bool done = false;
    for (const auto& s : suffixes) {
      if (!ends_with(rest, s.s)) continue;
      const std::string module = rest.substr(0, rest.size() - std::strlen(s.s));
      if (s.role == 6) {
        const std::string target = module + ".weight";
        if (!base_has(target))
          fail(
              "{}: adapter tensor {} replaces rows of {}, which the base checkpoint {} does not "
              "have",
              file, key, target, base.dir().string());
        // trainable_token_indices: a list targets the input embedding; a dict names modules.
        const std::vector<int64_t>* idx = nullptr;
        for (const auto& [name, rows] : cfg.trainable_token_indices) {
          if ((name.empty() && target == kEmbed) ||
              (!name.empty() && (module == name || ends_with(module, "." + name))))
            idx = &rows;
        }
        if (!idx)
          fail(
              "{}: adapter tensor {} holds trainable token rows, but trainable_token_indices in "
              "adapter_config.json names no indices for {}",
              file, key, module);
        auto shp = base_shape(target);
        if (t.shape.size() != 2 || shp.size() != 2 || t.shape[0] != int64_t(idx->size()) ||
            t.shape[1] != shp[1])
          fail(
              "{}: adapter tensor {} has shape {}, expected [{}, {}] ({} token indices, rows of "
              "{} {})",
              file, key, shape_str(t.shape), idx->size(), shp.size() == 2 ? shp[1] : 0, idx->size(),
              target, shape_str(shp));
        for (int64_t r : *idx)
          if (r >= shp[0])
            fail("{}: trainable token index {} is past the {} rows of {}", file, r, shp[0], target);
        p.token_rows[target] = TokenRows{&t, *idx};
        done = true;
        break;
      }
      LoraModule& m = p.lora[module];
      m.module = module;
      const TensorInfo** slot = nullptr;
      switch (s.role) {
        case 0:
          slot = &m.A;
          break;
        case 1:
          slot = &m.B;
          break;
        case 2:
          slot = &m.bias;
          break;
        case 3:
          slot = &m.A;
          m.embedding = true;
          break;
        case 4:
          slot = &m.B;
          m.embedding = true;
          break;
        case 5:
          slot = &m.magnitude;
          break;
      }
      if (*slot) fail("{}: module {} has two tensors for the same role ({})", file, module, key);
      *slot = &t;
      done = true;
      break;
    }
    if (done) continue;
    if (rest.find(".lora_") != std::string::npos)
      fail(
          "{}: adapter tensor {} is a LoRA tensor of an unknown form (an adapter name left in "
          "the key, like lora_A.default.weight? peft's save_pretrained removes it)",
          file, key);
    // A full tensor: modules_to_save, bias "all"/"lora_only", or an embedding's base layer
    // (peft saves `X.base_layer.weight` when it targets an embedding) -- loaded over the base.
    std::string target = rest;
    for (const char* seg : {".base_layer.", ".modules_to_save.", ".original_module."}) {
      size_t pos;
      while ((pos = target.find(seg)) != std::string::npos)
        target.replace(pos, std::strlen(seg), ".");
    }
    if (!base_has(target))
      fail("{}: adapter tensor {} replaces {}, which the base checkpoint {} does not have", file,
           key, target, base.dir().string());
    if (t.shape != base_shape(target))
      fail(
          "{}: adapter tensor {} has shape {}, but {} in {} has shape {} (a resized vocabulary "
          "is not supported)",
          file, key, shape_str(t.shape), target, base.dir().string(),
          shape_str(base_shape(target)));
    p.replace[target] = &t;
  }

  // Each LoRA module: complete, shaped like its base weight, with the rank the config gives.
  for (auto& [module, m] : p.lora) {
    const std::string w = module + ".weight";
    if (!m.A || !m.B)
      fail("{}: module {} has {} but no {}", file, module,
           m.A ? (m.embedding ? "lora_embedding_A" : "lora_A") : "lora_B",
           m.A ? (m.embedding ? "lora_embedding_B" : "lora_B") : "lora_A");
    if (!base_has(w))
      fail("{}: adapter tensor {} targets {}, which the base checkpoint {} does not have", file,
           m.A->name, w, base.dir().string());
    auto W = base_shape(w);
    const auto& A = m.A->shape;
    const auto& B = m.B->shape;
    if (W.size() != 2 || A.size() != 2 || B.size() != 2)
      fail("{}: {} {} / {} {} / base {} {}: LoRA needs 2-D tensors", file, m.A->name, shape_str(A),
           m.B->name, shape_str(B), w, shape_str(W));
    // Rows and columns of W as the update sees them: linear W [out, in], embedding W [V, H].
    int64_t out = m.embedding ? W[1] : W[0], in = m.embedding ? W[0] : W[1];
    if (!m.embedding && cfg.fan_in_fan_out) std::swap(out, in);
    if (A[1] != in || B[0] != out || A[0] != B[1])
      fail("{}: {} {} and {} {} do not fit {} {} of {}", file, m.A->name, shape_str(A), m.B->name,
           shape_str(B), w, shape_str(W), base.dir().string());
    m.scale = lora_scale_for(cfg, module);
    if (A[0] != m.scale.r)
      fail(
          "{}: {} has rank {}, but adapter_config.json gives module {} rank {} (r / "
          "rank_pattern)",
          file, m.A->name, A[0], module, m.scale.r);
    if (m.magnitude) {
      if (!cfg.use_dora)
        fail("{}: {} is a DoRA magnitude, but use_dora is false in adapter_config.json", file,
             m.magnitude->name);
      if (cfg.fan_in_fan_out && !m.embedding)
        fail("{}: DoRA with fan_in_fan_out is not supported by nanscope merge", file);
      if (m.magnitude->shape != std::vector<int64_t>{out})
        fail("{}: {} has shape {}, expected [{}]", file, m.magnitude->name,
             shape_str(m.magnitude->shape), out);
    } else if (cfg.use_dora) {
      fail("{}: use_dora is true but module {} has no lora_magnitude_vector", file, module);
    }
    if (m.bias) {
      const std::string b = module + ".bias";
      if (!base.find(b))
        fail(
            "{}: {} is a LoRA bias, but the base layer has no bias {} (peft cannot merge it "
            "either)",
            file, m.bias->name, b);
      if (m.bias->shape != base.find(b)->info->shape)
        fail("{}: {} has shape {}, but {} has shape {}", file, m.bias->name,
             shape_str(m.bias->shape), b, shape_str(base.find(b)->info->shape));
    }
    if (p.token_rows.count(w))
      fail(
          "{}: {} has both a LoRA and trainable token rows; nanscope does not merge that "
          "combination",
          file, w);
  }
  return p;
}

// ---- the output plan
// -----------------------------------------------------------------------------

struct OutTensor {
  std::string name;
  TensorRef source;                     // base tensor the values start from
  const TensorInfo* replace = nullptr;  // adapter tensor loaded over the base values
  std::vector<const LoraModule*> lora;  // weight updates, in peft's merge order
  const LoraModule* bias_of = nullptr;  // lora_bias: lora_B.bias added to this bias
  const TokenRows* rows = nullptr;
  DType dtype;  // output dtype of this tensor
  std::vector<int64_t> shape;
  uint64_t nbytes = 0;
  bool touched() const { return replace || !lora.empty() || bias_of || rows; }
};

struct Shard {
  std::string file;
  std::vector<size_t> tensors;  // indices into the plan
};

// ---- arithmetic
// ------------------------------------------------------------------------------------

// P[i, j] = sum_k L[i, k] * R[k, j], k in order, each step one fused multiply-add: the order a
// BLAS micro-kernel uses for a small inner dimension, so that the product agrees with torch's
// B @ A bit for bit in the common case (and within an ulp otherwise).
inline void lowrank_row(const float* Lrow, const float* R, int64_t r, int64_t cols, float* out) {
  for (int64_t j = 0; j < cols; ++j) out[j] = 0.0f;
  for (int64_t k = 0; k < r; ++k) {
    const float l = Lrow[k];
    const float* Rk = R + k * cols;
    for (int64_t j = 0; j < cols; ++j) out[j] = std::fma(l, Rk[j], out[j]);
  }
}

// A LoRA update prepared for row-wise evaluation: dW[i, :] = fl(P[i, :] * scale).
struct PreparedLora {
  const LoraModule* m = nullptr;
  std::vector<float> L, R;  // [rows, r], [r, cols]
  int64_t r = 0;
  float scale = 0;
  std::vector<float> magnitude;   // DoRA
  bool dora_columns = false;      // DoRA on an embedding: norms over columns (pass 1)
  std::vector<float> col_factor;  // filled by pass 1
  bool round_delta = false;       // peft's embedding double rounding
};

PreparedLora prepare(const LoraModule& m, const SafetensorsFile& f, bool fan_in_fan_out,
                     bool peft_embedding_rounding) {
  PreparedLora p;
  p.m = &m;
  p.r = m.A->shape[0];
  p.scale = float(m.scale.scale);
  std::vector<float> A = load_all_f32(f, *m.A), B = load_all_f32(f, *m.B);
  const int64_t a_cols = m.A->shape[1], b_rows = m.B->shape[0];
  if (m.embedding || fan_in_fan_out) {
    // W rows follow A's columns: L = A^T [a_cols, r], R = B^T [r, b_rows].
    p.L.resize(size_t(a_cols * p.r));
    p.R.resize(size_t(p.r * b_rows));
    for (int64_t k = 0; k < p.r; ++k)
      for (int64_t i = 0; i < a_cols; ++i) p.L[size_t(i * p.r + k)] = A[size_t(k * a_cols + i)];
    for (int64_t j = 0; j < b_rows; ++j)
      for (int64_t k = 0; k < p.r; ++k) p.R[size_t(k * b_rows + j)] = B[size_t(j * p.r + k)];
  } else {
    p.L = std::move(B);  // [out, r]
    p.R = std::move(A);  // [r, in]
  }
  if (m.magnitude) {
    p.magnitude = load_all_f32(f, *m.magnitude);
    p.dora_columns = m.embedding;
  }
  p.round_delta = m.embedding && peft_embedding_rounding && !m.magnitude;
  return p;
}

struct Stats {
  double num = 0, den = 0;  // sum (round(S) - W0)^2, sum (S - W0)^2
  double dot = 0, err = 0;  // sum (round(S) - W0)(S - W0), sum (round(S) - S)^2
  uint64_t lost = 0, updated = 0, nonfinite = 0, base_nonfinite = 0;
  void add(const Stats& o) {
    num += o.num, den += o.den, lost += o.lost, updated += o.updated, nonfinite += o.nonfinite;
    dot += o.dot, err += o.err;
    base_nonfinite += o.base_nonfinite;
  }
};

template <typename Fn>
void parallel_rows(int64_t n, int threads, Fn&& fn) {
  int t = int(std::min<int64_t>(threads, std::max<int64_t>(1, n / 4)));
  if (t <= 1) {
    fn(int64_t{0}, n, 0);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errs(static_cast<size_t>(t));
  const int64_t chunk = (n + t - 1) / t;
  for (int w = 0; w < t; ++w) {
    const int64_t b = w * chunk, e = std::min(n, b + chunk);
    if (b >= e) break;
    pool.emplace_back([&, w, b, e] {
      try {
        fn(b, e, w);
      } catch (...) {
        errs[size_t(w)] = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  for (auto& e : errs)
    if (e) std::rethrow_exception(e);
}

class Merger {
 public:
  Merger(const MergeOptions& o, const Checkpoint& base, const Adapter& ad, int threads)
      : o_(o), base_(base), ad_(ad), threads_(threads) {}

  void check_cancel() const {
    if (o_.cancel && o_.cancel->load()) fail("merge: interrupted; nothing was written");
  }

  // Computes one output tensor and streams it to the writer. Returns its statistics.
  Stats run(const OutTensor& t, SafetensorsWriter& w) {
    Stats st;
    const TensorInfo& src_info = t.replace ? *t.replace : *t.source.info;
    const std::byte* src = t.replace ? ad_.file().data(*t.replace).data() : t.source.bytes().data();
    const DType src_dtype = src_info.dtype;
    const uint64_t numel = src_info.numel();
    const bool is_float = is_float_computable(src_dtype);

    if (!t.touched() && (!is_float || src_dtype == t.dtype)) {
      // Unchanged bytes: copy in chunks, counting NaN/inf on the way.
      auto bytes = t.source.bytes();
      if (is_float) st.base_nonfinite = st.nonfinite = count_nonfinite(bytes, src_dtype, numel);
      constexpr size_t kChunk = size_t(64) << 20;
      for (size_t off = 0; off < bytes.size(); off += kChunk) {
        check_cancel();
        w.write(bytes.subspan(off, std::min(kChunk, bytes.size() - off)));
      }
      t.source.release();
      return st;
    }

    const int64_t cols =
        t.shape.size() >= 2 ? t.shape.back() : std::max<int64_t>(1, int64_t(numel));
    const int64_t rows = cols ? int64_t(numel / uint64_t(cols)) : 0;
    std::vector<PreparedLora> lora;
    for (const LoraModule* m : t.lora)
      lora.push_back(prepare(*m, ad_.file(), ad_.config().fan_in_fan_out && !m->embedding,
                             o_.peft_embedding_rounding));
    std::vector<float> bias_delta;
    if (t.bias_of) {
      std::vector<float> b = load_all_f32(ad_.file(), *t.bias_of->bias);
      const float s = float(t.bias_of->scale.scale);
      bias_delta.resize(b.size());
      for (size_t i = 0; i < b.size(); ++i) bias_delta[i] = b[i] * s;
    }
    std::vector<float> token_values;
    std::map<int64_t, int64_t> token_row;  // weight row -> row of the values
    if (t.rows) {
      token_values = load_all_f32(ad_.file(), *t.rows->values);
      for (size_t i = 0; i < t.rows->rows.size(); ++i) token_row[t.rows->rows[i]] = int64_t(i);
    }
    const DType out = t.dtype;
    const size_t out_es = size_t(dtype_bits(out) / 8);
    const size_t src_es = size_t(dtype_bits(src_dtype) / 8);
    const int64_t block = std::max<int64_t>(1, (int64_t(1) << 21) / std::max<int64_t>(1, cols));

    // The base values as peft holds them once loaded: in the loaded dtype (= output dtype); a
    // replacement from the adapter is rounded into that dtype (load_state_dict copies into it).
    auto load_block = [&](int64_t r0, int64_t r1, float* W0) {
      load_to_f32(src + size_t(r0 * cols) * src_es, src_dtype, W0, size_t((r1 - r0) * cols));
      if (t.replace) round_inplace(W0, size_t((r1 - r0) * cols), out);
    };
    // S = W0 + dW for rows [r0, r1) of one LoRA (no DoRA scaling).
    auto add_update = [&](const PreparedLora& p, int64_t r0, int64_t r1, float* S, float* tmp) {
      for (int64_t i = r0; i < r1; ++i) {
        float* Srow = S + (i - r0) * cols;
        lowrank_row(p.L.data() + i * p.r, p.R.data(), p.r, cols, tmp);
        for (int64_t j = 0; j < cols; ++j) {
          float d = tmp[j] * p.scale;
          if (p.round_delta) d = round_to(d, out);
          Srow[j] = Srow[j] + d;
        }
      }
    };

    // DoRA on an embedding: pass 1 computes ||W + dW|| per column over all rows.
    for (auto& p : lora) {
      if (!p.dora_columns) continue;
      std::vector<double> sq(size_t(cols), 0.0);
      std::vector<float> S(size_t(block * cols)), tmp(static_cast<size_t>(cols));
      for (int64_t r0 = 0; r0 < rows; r0 += block) {
        check_cancel();
        const int64_t r1 = std::min(rows, r0 + block);
        load_block(r0, r1, S.data());
        add_update(p, r0, r1, S.data(), tmp.data());
        for (int64_t i = 0; i < r1 - r0; ++i)
          for (int64_t j = 0; j < cols; ++j) {
            const double v = S[size_t(i * cols + j)];
            sq[size_t(j)] += v * v;
          }
      }
      p.col_factor.resize(size_t(cols));
      for (int64_t j = 0; j < cols; ++j)
        p.col_factor[size_t(j)] = p.magnitude[size_t(j)] / float(std::sqrt(sq[size_t(j)]));
    }

    std::vector<float> W0(size_t(block * cols)), S(size_t(block * cols));
    std::vector<std::byte> obuf(size_t(block * cols) * out_es);
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      check_cancel();
      const int64_t r1 = std::min(rows, r0 + block);
      const int64_t n = r1 - r0;
      std::vector<Stats> part(static_cast<size_t>(std::max(1, threads_)));
      parallel_rows(n, threads_, [&](int64_t b, int64_t e, int tid) {
        std::vector<float> tmp(static_cast<size_t>(cols));
        float* w0 = W0.data() + b * cols;
        float* s = S.data() + b * cols;
        load_block(r0 + b, r0 + e, w0);
        std::memcpy(s, w0, size_t((e - b) * cols) * sizeof(float));
        for (const auto& p : lora) {
          if (p.magnitude.empty()) {
            add_update(p, r0 + b, r0 + e, s, tmp.data());
            continue;
          }
          // DoRA (lora/variants.py merge_unsafe): norm of W + dW, factor m / norm, then
          // factor * (W + dW), all fp32, rounded once. Row norms for linear layers.
          add_update(p, r0 + b, r0 + e, s, tmp.data());
          for (int64_t i = 0; i < e - b; ++i) {
            float* row = s + i * cols;
            if (p.dora_columns) {
              for (int64_t j = 0; j < cols; ++j) row[j] = p.col_factor[size_t(j)] * row[j];
            } else {
              double sq = 0;
              for (int64_t j = 0; j < cols; ++j) sq += double(row[j]) * double(row[j]);
              const float f = p.magnitude[size_t(r0 + b + i)] / float(std::sqrt(sq));
              for (int64_t j = 0; j < cols; ++j) row[j] = f * row[j];
            }
          }
        }
        if (!bias_delta.empty())
          for (int64_t i = 0; i < e - b; ++i)
            for (int64_t j = 0; j < cols; ++j)
              s[i * cols + j] = s[i * cols + j] + bias_delta[size_t((r0 + b + i) * cols + j)];
        Stats& ps = part[size_t(tid)];
        const int64_t m = (e - b) * cols;
        for (int64_t k = 0; k < m; ++k) {
          const float rounded = round_to(s[k], out);
          const double d_ideal = double(s[k]) - double(w0[k]);
          if (!std::isfinite(w0[k])) ++ps.base_nonfinite;
          if (!std::isfinite(rounded)) ++ps.nonfinite;
          if (d_ideal != 0.0 && std::isfinite(d_ideal)) {
            const double d_kept = double(rounded) - double(w0[k]);
            ps.num += d_kept * d_kept;
            ps.den += d_ideal * d_ideal;
            ps.dot += d_kept * d_ideal;
            ps.err += (d_kept - d_ideal) * (d_kept - d_ideal);
            ++ps.updated;
            if (rounded == w0[k]) ++ps.lost;
          }
        }
        if (t.rows)
          for (int64_t i = 0; i < e - b; ++i) {
            auto it = token_row.find(r0 + b + i);
            if (it == token_row.end()) continue;
            for (int64_t j = 0; j < cols; ++j)
              s[i * cols + j] = round_to(token_values[size_t(it->second * cols + j)], out);
          }
        store_from_f32(s, out, obuf.data() + size_t(b * cols) * out_es, size_t(m));
      });
      for (const auto& ps : part) st.add(ps);
      w.write(std::span<const std::byte>(obuf.data(), size_t(n * cols) * out_es));
    }
    if (t.rows) {  // token rows replaced after the scan: count their NaN/inf too
      for (float v : token_values)
        if (!std::isfinite(round_to(v, out))) ++st.nonfinite;
    }
    t.source.release();
    return st;
  }

 private:
  const MergeOptions& o_;
  const Checkpoint& base_;
  const Adapter& ad_;
  int threads_;
};

struct TmpDirGuard {
  fs::path path;
  bool keep = false;
  ~TmpDirGuard() {
    if (!keep && !path.empty()) {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  }
};

void write_text(const fs::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary);
  f << s;
  f.flush();
  if (!f) throw OutputError(fmt::format("{}: cannot write", p.string()));
}

}  // namespace

MergeResult merge(const MergeOptions& o) {
  const auto t_start = std::chrono::steady_clock::now();
  MergeResult res;
  std::error_code ec;

  // The output: a fresh directory, built beside the target and renamed into place at the end.
  fs::path out = o.out.lexically_normal();
  if (out.filename().empty()) out = out.parent_path();
  if (out.empty()) fail("merge: --out is empty");
  if (fs::exists(out, ec)) {
    if (!fs::is_directory(out, ec))
      fail("merge: --out {} exists and is not a directory; refusing to replace it", out.string());
    if (!fs::is_empty(out, ec))
      fail(
          "merge: --out {} exists and is not empty; refusing to overwrite it (choose a new "
          "directory)",
          out.string());
  }
  fs::path parent = out.has_parent_path() ? out.parent_path() : fs::path(".");
  if (!fs::is_directory(parent, ec))
    fail("merge: the parent directory {} of --out does not exist", parent.string());

  Checkpoint base = Checkpoint::open(o.base);
  Adapter ad = Adapter::open(o.adapter);
  const AdapterConfig& cfg = ad.config();
  res.base_dtype = base.storage_dtype();
  res.out_dtype = o.dtype.value_or(res.base_dtype);
  if (!is_float_computable(res.out_dtype))
    fail("merge: output dtype {} is not bf16, fp16 or fp32", dtype_name(res.out_dtype));
  const int threads =
      o.threads > 0 ? o.threads : int(std::max(1u, std::thread::hardware_concurrency()));

  // Tied embeddings: one tensor (embed_tokens) serves as the output projection too.
  res.base_tied = base.config().tie_word_embeddings && !base.find(kLmHead) && base.find(kEmbed);
  AdapterPlan plan = plan_adapter(ad, base, res.base_tied);

  // Modules the file carries that the config would not target: peft would leave them out.
  for (const auto& [module, m] : plan.lora)
    if (!is_targeted(cfg, module))
      res.warnings.push_back(fmt::format(
          "module {} has LoRA tensors but adapter_config.json does not target it (peft would "
          "ignore them); merged anyway",
          module));

  const bool lora_embed = plan.lora.count("model.embed_tokens") > 0;
  const bool lora_lm = plan.lora.count("lm_head") > 0;
  if (res.base_tied && cfg.ensure_weight_tying && lora_lm) {
    res.warnings.push_back(
        "ensure_weight_tying: the lm_head LoRA is the tied copy of the embedding's; applied once");
    plan.lora.erase("lm_head");
  }
  const bool touches_lm = lora_lm || plan.replace.count(kLmHead);
  res.untied = res.base_tied && !cfg.ensure_weight_tying &&
               ((o.tied == TiedMode::Untie && (lora_embed || touches_lm)) ||
                (plan.replace.count(kLmHead) && !plan.lora.count("lm_head") &&
                 std::find(cfg.modules_to_save.begin(), cfg.modules_to_save.end(), "lm_head") !=
                     cfg.modules_to_save.end()));
  res.tie_word_embeddings = base.config().tie_word_embeddings && !res.untied;

  // The output tensors: the base's, in its shard and file order; lm_head added after the
  // embedding when untying.
  std::vector<OutTensor> tensors;
  std::vector<Shard> shards;
  for (const auto& file : base.files()) {
    Shard sh;
    sh.file = file->path().filename().string();
    for (const TensorInfo& info : file->tensors()) {
      auto ref = base.find(info.name);
      if (!ref || ref->info != &info) continue;  // not in the index: not part of the model
      auto add = [&](const std::string& name) {
        OutTensor t;
        t.name = name;
        t.source = *ref;
        t.shape = info.shape;
        t.dtype = is_float_computable(info.dtype) ? res.out_dtype : info.dtype;
        t.nbytes = info.numel() * uint64_t(dtype_bits(t.dtype)) / 8;
        sh.tensors.push_back(tensors.size());
        tensors.push_back(std::move(t));
      };
      add(info.name);
      if (res.untied && info.name == kEmbed) add(kLmHead);
    }
    shards.push_back(std::move(sh));
  }
  std::map<std::string, size_t> index_of;
  for (size_t i = 0; i < tensors.size(); ++i) index_of[tensors[i].name] = i;
  // Where an update to `name` lands: tied and not untied, lm_head is the embedding.
  auto target = [&](const std::string& name) -> OutTensor& {
    std::string n = (name == kLmHead && res.base_tied && !res.untied) ? std::string(kEmbed) : name;
    return tensors[index_of.at(n)];
  };
  for (const auto& [name, src] : plan.replace) {
    OutTensor& t = target(name);
    // In a tied model that stays tied, lm_head.base_layer.weight is the embedding itself.
    if (!t.replace || name != kLmHead) t.replace = src;
  }
  // peft merges in module order; embed_tokens comes before lm_head.
  for (const auto& m : {std::string("model.embed_tokens")}) {
    if (plan.lora.count(m)) target(m + ".weight").lora.push_back(&plan.lora.at(m));
  }
  for (const auto& [module, m] : plan.lora) {
    if (module == "model.embed_tokens") continue;
    target(module + ".weight").lora.push_back(&m);
    if (m.bias) target(module + ".bias").bias_of = &m;
  }
  for (const auto& [name, rows] : plan.token_rows) {
    target(name).rows = &rows;
    if (res.untied && name == kEmbed) tensors[index_of.at(kLmHead)].rows = &rows;
  }
  for (const auto& t : tensors) {
    if (t.lora.size() > 1)
      res.warnings.push_back(fmt::format(
          "{} receives {} LoRA updates (tied embedding and output projection); summed in fp32 and "
          "rounded once, where peft rounds after each",
          t.name, t.lora.size()));
  }

  // Sharding: like the base, or greedily by --max-shard-size.
  if (o.max_shard_size > 0) {
    std::vector<size_t> order;
    for (const auto& sh : shards) order.insert(order.end(), sh.tensors.begin(), sh.tensors.end());
    shards.clear();
    uint64_t cur = 0;
    for (size_t i : order) {
      if (shards.empty() || (cur + tensors[i].nbytes > o.max_shard_size && cur > 0)) {
        shards.push_back({});
        cur = 0;
      }
      shards.back().tensors.push_back(i);
      cur += tensors[i].nbytes;
    }
    for (size_t k = 0; k < shards.size(); ++k)
      shards[k].file = shards.size() == 1 ? "model.safetensors"
                                          : fmt::format("model-{:05d}-of-{:05d}.safetensors", k + 1,
                                                        shards.size());
  } else if (shards.size() == 1) {
    shards[0].file = "model.safetensors";
  }

  // Build in "<out>.tmp-<pid>"; removed on any error, renamed into place on success.
  TmpDirGuard guard;
  guard.path = parent / (out.filename().string() + ".tmp-" + std::to_string(::getpid()));
  fs::remove_all(guard.path, ec);
  if (!fs::create_directory(guard.path, ec))
    throw OutputError(fmt::format("{}: cannot create ({})", guard.path.string(), ec.message()));

  Merger merger(o, base, ad, threads);
  std::vector<TensorFidelity> fid;
  Stats total;
  size_t done = 0;
  for (const auto& sh : shards) {
    std::vector<TensorSpec> specs;
    for (size_t i : sh.tensors)
      specs.push_back({tensors[i].name, tensors[i].dtype, tensors[i].shape});
    SafetensorsWriter w(guard.path / sh.file, specs, {{"format", "pt"}});
    for (size_t i : sh.tensors) {
      const OutTensor& t = tensors[i];
      merger.check_cancel();
      if (o.progress) o.progress(t.name, done, tensors.size());
      Stats st = merger.run(t, w);
      ++done;
      if (!t.lora.empty() || t.bias_of) {
        ++res.merged;
        TensorFidelity f;
        f.tensor = t.name;
        f.kept = st.den > 0 ? std::sqrt(st.num / st.den) : 1.0;
        f.projected = st.den > 0 ? st.dot / st.den : 1.0;
        f.relative_error = st.den > 0 ? std::sqrt(st.err / st.den) : 0.0;
        f.lost = st.lost;
        f.update_elements = st.updated;
        f.elements = t.source.info->numel();
        fid.push_back(f);
        total.add(st);
        res.lost += st.lost;
        res.update_elements += st.updated;
      } else if (t.touched()) {
        ++res.replaced;
      } else {
        ++res.copied;
      }
      if (st.nonfinite) {
        NonfiniteTensor nf;
        nf.tensor = t.name;
        nf.count = st.nonfinite;
        // Blame: the base if it was already non-finite, else the adapter's own tensors, else
        // the arithmetic (finite inputs, a result beyond the output dtype's range).
        std::vector<const TensorInfo*> used;
        for (const LoraModule* m : t.lora)
          for (const TensorInfo* x : {m->A, m->B, m->magnitude})
            if (x) used.push_back(x);
        if (t.bias_of) used.push_back(t.bias_of->bias);
        if (t.replace) used.push_back(t.replace);
        if (t.rows) used.push_back(t.rows->values);
        for (const TensorInfo* x : used)
          if (plan.adapter_nonfinite.count(x->name)) nf.adapter_tensors.push_back(x->name);
        if (!nf.adapter_tensors.empty()) {
          nf.cause = "adapter";
          nf.detail = fmt::format("the adapter's own tensors hold NaN/inf: {}",
                                  fmt::join(nf.adapter_tensors, ", "));
        } else if (st.base_nonfinite) {
          nf.cause = "base";
          nf.detail = fmt::format("the base tensor already holds {} NaN/inf", st.base_nonfinite);
        } else {
          nf.cause = "arithmetic";
          nf.detail =
              fmt::format("base and adapter are finite; W + dW exceeds the range of {} (max {})",
                          dtype_cli_name(t.dtype), dtype_max(t.dtype));
        }
        res.nonfinite.push_back(std::move(nf));
      }
    }
    w.commit();
    res.bytes_written += w.total_bytes();
    res.shards.push_back(sh.file);
  }
  res.kept = total.den > 0 ? std::sqrt(total.num / total.den) : 1.0;
  res.projected = total.den > 0 ? total.dot / total.den : 1.0;
  res.relative_error = total.den > 0 ? std::sqrt(total.err / total.den) : 0.0;
  std::sort(fid.begin(), fid.end(), [](const TensorFidelity& a, const TensorFidelity& b) {
    return a.relative_error > b.relative_error;
  });
  if (fid.size() > 5) fid.resize(5);
  res.worst = std::move(fid);

  if (!res.nonfinite.empty() && !o.allow_nonfinite) {
    res.refused = true;
    res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    return res;  // the guard removes the temporary directory
  }

  // The index when sharded.
  if (res.shards.size() > 1) {
    nlohmann::ordered_json idx;
    uint64_t total_size = 0, params = 0;
    std::map<std::string, std::string> wm;
    for (const auto& sh : shards)
      for (size_t i : sh.tensors) {
        total_size += tensors[i].nbytes;
        params += tensors[i].source.info->numel();
        wm[tensors[i].name] = sh.file;
      }
    idx["metadata"] = {{"total_parameters", params}, {"total_size", total_size}};
    idx["weight_map"] = nlohmann::ordered_json::object();
    for (const auto& [k, v] : wm) idx["weight_map"][k] = v;
    write_text(guard.path / "model.safetensors.index.json", idx.dump(2) + "\n");
  }

  // config.json: the base's, with the dtype (transformers 5 reads `dtype`; `torch_dtype` is
  // kept in step where the base had it) and the tie flag.
  {
    std::ifstream in(base.dir() / "config.json", std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    nlohmann::ordered_json c = nlohmann::ordered_json::parse(ss.str());
    c["dtype"] = torch_dtype_name(res.out_dtype);
    if (c.contains("torch_dtype")) c["torch_dtype"] = torch_dtype_name(res.out_dtype);
    if (res.untied) c["tie_word_embeddings"] = false;
    write_text(guard.path / "config.json", c.dump(2) + "\n");
  }
  static const char* kSideFiles[] = {"generation_config.json",
                                     "tokenizer.json",
                                     "tokenizer_config.json",
                                     "vocab.json",
                                     "merges.txt",
                                     "special_tokens_map.json",
                                     "chat_template.jinja",
                                     "added_tokens.json",
                                     "tokenizer.model",
                                     "chat_template.json",
                                     "preprocessor_config.json"};
  for (const char* f : kSideFiles) {
    if (!fs::exists(base.dir() / f, ec)) continue;
    fs::copy_file(base.dir() / f, guard.path / f, ec);
    if (ec)
      throw OutputError(fmt::format("{}: cannot copy to {} ({})", (base.dir() / f).string(),
                                    guard.path.string(), ec.message()));
    res.side_files.push_back(f);
  }

  merger.check_cancel();
  if (fs::exists(out, ec)) fs::remove(out, ec);  // an empty directory: checked above
  fs::rename(guard.path, out, ec);
  if (ec)
    throw OutputError(fmt::format("{}: cannot rename to {} ({})", guard.path.string(), out.string(),
                                  ec.message()));
  guard.keep = true;
  res.written = true;
  res.out = out;
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  return res;
}

nlohmann::json merge_result_json(const MergeResult& r) {
  nlohmann::json j;
  j["merged"] = r.merged;
  j["replaced"] = r.replaced;
  j["copied"] = r.copied;
  j["out_dtype"] = dtype_cli_name(r.out_dtype);
  j["base_dtype"] = dtype_cli_name(r.base_dtype);
  nlohmann::json worst = nlohmann::json::array();
  for (const auto& f : r.worst)
    worst.push_back({{"tensor", f.tensor},
                     {"kept", f.kept},
                     {"projected", f.projected},
                     {"relative_error", f.relative_error},
                     {"lost_elements", f.lost},
                     {"update_elements", f.update_elements},
                     {"elements", f.elements}});
  j["fidelity"] = {{"kept", r.kept},
                   {"projected", r.projected},
                   {"relative_error", r.relative_error},
                   {"lost_elements", r.lost},
                   {"update_elements", r.update_elements},
                   {"worst", worst}};
  nlohmann::json nf = nlohmann::json::array();
  for (const auto& n : r.nonfinite)
    nf.push_back({{"tensor", n.tensor},
                  {"count", n.count},
                  {"cause", n.cause},
                  {"adapter_tensors", n.adapter_tensors},
                  {"detail", n.detail}});
  j["nonfinite"] = nf;
  j["refused"] = r.refused;
  j["written"] = r.written;
  j["out"] = r.written ? nlohmann::json(r.out.string()) : nlohmann::json(nullptr);
  j["shards"] = r.written ? nlohmann::json(r.shards) : nlohmann::json::array();
  j["tie_word_embeddings"] = r.tie_word_embeddings;
  j["untied"] = r.untied;
  j["side_files"] = r.side_files;
  j["warnings"] = r.warnings;
  j["bytes"] = r.bytes_written;
  j["seconds"] = r.seconds;
  return j;
}

std::string merge_summary(const MergeResult& r) {
  std::string s;
  if (r.refused) {
    s += fmt::format(
        "REFUSED: the merged weights would hold NaN/inf in {} tensor(s); nothing "
        "was written (--allow-nonfinite writes anyway)\n",
        r.nonfinite.size());
  } else {
    s += fmt::format("wrote {} ({} shard(s), {}): {} merged, {} replaced, {} copied\n",
                     r.out.string(), r.shards.size(), dtype_cli_name(r.out_dtype), r.merged,
                     r.replaced, r.copied);
  }
  for (const auto& n : r.nonfinite)
    s += fmt::format("  {}: {} non-finite ({}): {}\n", n.tensor, n.count, n.cause, n.detail);
  s += fmt::format(
      "fidelity: kept {:.6f} (projected {:.6f}, relative error {:.2e}); {} of {} "
      "updated elements lost entirely to rounding into {}\n",
      r.kept, r.projected, r.relative_error, r.lost, r.update_elements,
      dtype_cli_name(r.out_dtype));
  for (const auto& f : r.worst)
    if (f.relative_error > 0)
      s += fmt::format("  {}: kept {:.6f}, projected {:.6f}, relative error {:.2e}, lost {}\n",
                       f.tensor, f.kept, f.projected, f.relative_error, f.lost);
  if (r.untied)
    s += "tied embeddings: the adapter changes embed_tokens or lm_head, so both were written and "
         "tie_word_embeddings set to false\n";
  for (const auto& w : r.warnings) s += "warning: " + w + "\n";
  return s;
}

}  // namespace nanscope
