#include "tools/merge.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "formats/adapter.hpp"
#include "formats/checkpoint.hpp"
#include "formats/safetensors.hpp"
#include "numerics/dtype_simd.hpp"

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
// The AVX2 path keeps 64 columns of the sum in registers over all k (the same fused
// multiply-adds in the same order, so the same bits) instead of a pass over the row per k;
// eight independent accumulators hide the FMA latency.
inline void lowrank_row(const float* Lrow, const float* R, int64_t r, int64_t cols, float* out) {
  int64_t j0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; j0 + 64 <= cols; j0 += 64) {
    __m256 a[8];
    for (auto& x : a) x = _mm256_setzero_ps();
    for (int64_t k = 0; k < r; ++k) {
      const __m256 l = _mm256_set1_ps(Lrow[k]);
      const float* Rk = R + k * cols + j0;
      for (int q = 0; q < 8; ++q) a[q] = _mm256_fmadd_ps(l, _mm256_loadu_ps(Rk + 8 * q), a[q]);
    }
    for (int q = 0; q < 8; ++q) _mm256_storeu_ps(out + j0 + 8 * q, a[q]);
  }
  for (; j0 + 8 <= cols; j0 += 8) {
    __m256 a0 = _mm256_setzero_ps();
    for (int64_t k = 0; k < r; ++k)
      a0 = _mm256_fmadd_ps(_mm256_set1_ps(Lrow[k]), _mm256_loadu_ps(R + k * cols + j0), a0);
    _mm256_storeu_ps(out + j0, a0);
  }
  if (j0 == cols) return;
#endif
  for (int64_t j = j0; j < cols; ++j) out[j] = 0.0f;
  for (int64_t k = 0; k < r; ++k) {
    const float l = Lrow[k];
    const float* Rk = R + k * cols;
    for (int64_t j = j0; j < cols; ++j) out[j] = std::fma(l, Rk[j], out[j]);
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

// A fixed set of worker threads, started once per merge: each parallel step runs on them
// instead of on threads spawned for every block.
class Pool {
 public:
  explicit Pool(int n) : n_(std::max(1, n)) {
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i] { loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      ++gen_;
    }
    cv_.notify_all();
    for (auto& th : workers_) th.join();
  }
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;
  int size() const { return n_; }

  // fn(b, e, w) over [0, n) in contiguous chunks, one per worker w; the caller is worker 0.
  template <typename Fn>
  void parallel_rows(int64_t n, Fn&& fn) {
    const int t = int(std::min<int64_t>(n_, std::max<int64_t>(1, n / 4)));
    if (t <= 1) {
      fn(int64_t{0}, n, 0);
      return;
    }
    const int64_t chunk = (n + t - 1) / t;
    std::vector<std::exception_ptr> errs(static_cast<size_t>(t));
    std::function<void(int)> job = [&](int w) {
      const int64_t b = w * chunk, e = std::min(n, b + chunk);
      if (b >= e) return;
      try {
        fn(b, e, w);
      } catch (...) {
        errs[size_t(w)] = std::current_exception();
      }
    };
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &job;
      active_ = t;
      remaining_ = t - 1;
      ++gen_;
    }
    cv_.notify_all();
    job(0);
    {
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [&] { return remaining_ == 0; });
      job_ = nullptr;
    }
    for (auto& e : errs)
      if (e) std::rethrow_exception(e);
  }

 private:
  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job = nullptr;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_ != seen; });
        seen = gen_;
        if (stop_) return;
        if (id >= active_) continue;
        job = job_;
      }
      (*job)(id);
      {
        std::lock_guard<std::mutex> lk(mu_);
        --remaining_;
      }
      done_cv_.notify_one();
    }
  }

  int n_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  uint64_t gen_ = 0;
  bool stop_ = false;
  int active_ = 0, remaining_ = 0;
  const std::function<void(int)>* job_ = nullptr;
};

#if defined(__AVX2__)
// The fidelity sums of one row as AVX2 accumulators: sum (r - w0)^2, sum (s - w0)^2,
// sum (r - w0)(s - w0), sum (r - s)^2 over the updated elements, and the counts. Reduced into
// Stats once per row (row_stats_end), so that the sums come out the same whether a row is fed in
// one go or in column chunks.
//
// Two tiers. The common chunk of 8 (every value finite, differences below 2^48) adds its terms
// with fp32 fused multiply-adds into eight float lanes, which are moved into the double lanes
// every kFlush chunks: a lane then never sums more than kFlush terms in fp32 (relative error of
// the figures ~1e-6, against the 6 digits they are reported with), at a third of the cost of
// converting every element to double. A chunk holding NaN/inf or huge differences takes the
// exact double path, which also counts the non-finite values. Where the stored value equals the
// ideal one (fp32 output) both tiers see identical terms for num, den and dot, so kept and
// projected are exactly 1 and the error exactly 0.
struct RowSums {
  static constexpr int kFlush = 32;
  __m256d num = _mm256_setzero_pd(), den = _mm256_setzero_pd(), dot = _mm256_setzero_pd(),
          err = _mm256_setzero_pd();
  __m256 fnum = _mm256_setzero_ps(), fden = _mm256_setzero_ps(), fdot = _mm256_setzero_ps(),
         ferr = _mm256_setzero_ps();
  int pending = 0;  // fp32 chunks not yet moved into the double lanes
};
// Element counts as 32-bit lane counters (a mask lane of -1 subtracted adds 1), so that counting
// is one vector op per 8 elements; moved into Stats by add_counts often enough not to overflow.
// w_ok, r_ok and elements count only the chunks of the double path (the fp32 path's are all
// finite).
struct LaneCounts {
  __m256i w_ok = _mm256_setzero_si256(), r_ok = _mm256_setzero_si256(),
          updated = _mm256_setzero_si256(), lost = _mm256_setzero_si256();
  uint64_t elements = 0;
};

inline __m256d add_halves_pd(__m256d acc, __m256 v) {
  acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  return _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

// Moves the fp32 lanes into the double lanes.
inline void flush_sums(RowSums& a) {
  a.num = add_halves_pd(a.num, a.fnum);
  a.den = add_halves_pd(a.den, a.fden);
  a.dot = add_halves_pd(a.dot, a.fdot);
  a.err = add_halves_pd(a.err, a.ferr);
  a.fnum = a.fden = a.fdot = a.ferr = _mm256_setzero_ps();
  a.pending = 0;
}

// The exact tier: 8 elements in double. An element counts where s != w and both are finite
// (then s - w in double is finite and non-zero).
inline void row_stats8_double(__m256 w8, __m256 s8, __m256 r8, RowSums& a, LaneCounts& c) {
  const __m256 fabs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 finf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  // isfinite: |x| < inf is false for inf and NaN.
  const __m256 w_ok = _mm256_cmp_ps(_mm256_and_ps(w8, fabs_mask), finf, _CMP_LT_OQ);
  const __m256 r_ok = _mm256_cmp_ps(_mm256_and_ps(r8, fabs_mask), finf, _CMP_LT_OQ);
  const __m256 s_ok = _mm256_cmp_ps(_mm256_and_ps(s8, fabs_mask), finf, _CMP_LT_OQ);
  const __m256 upd = _mm256_and_ps(_mm256_cmp_ps(s8, w8, _CMP_NEQ_UQ), _mm256_and_ps(w_ok, s_ok));
  const __m256 lost = _mm256_and_ps(upd, _mm256_cmp_ps(r8, w8, _CMP_EQ_OQ));
  c.w_ok = _mm256_sub_epi32(c.w_ok, _mm256_castps_si256(w_ok));
  c.r_ok = _mm256_sub_epi32(c.r_ok, _mm256_castps_si256(r_ok));
  c.updated = _mm256_sub_epi32(c.updated, _mm256_castps_si256(upd));
  c.lost = _mm256_sub_epi32(c.lost, _mm256_castps_si256(lost));
  c.elements += 8;
  const unsigned m8 = unsigned(_mm256_movemask_ps(upd));
  if (!m8) return;
  for (int h = 0; h < 2; ++h) {
    const unsigned mm = (m8 >> (4 * h)) & 0xf;
    if (!mm) continue;
    const __m128 wh = h ? _mm256_extractf128_ps(w8, 1) : _mm256_castps256_ps128(w8);
    const __m128 sh = h ? _mm256_extractf128_ps(s8, 1) : _mm256_castps256_ps128(s8);
    const __m128 rh = h ? _mm256_extractf128_ps(r8, 1) : _mm256_castps256_ps128(r8);
    const __m256d wd = _mm256_cvtps_pd(wh);
    __m256d di = _mm256_sub_pd(_mm256_cvtps_pd(sh), wd);
    __m256d dk = _mm256_sub_pd(_mm256_cvtps_pd(rh), wd);
    if (mm != 0xf) {  // elements left out add +0, as before
      const __m256d m = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(
          _mm_castps_si128(h ? _mm256_extractf128_ps(upd, 1) : _mm256_castps256_ps128(upd))));
      di = _mm256_and_pd(di, m);
      dk = _mm256_and_pd(dk, m);
    }
    const __m256d e = _mm256_sub_pd(dk, di);
    a.num = _mm256_add_pd(a.num, _mm256_mul_pd(dk, dk));
    a.den = _mm256_add_pd(a.den, _mm256_mul_pd(di, di));
    a.dot = _mm256_add_pd(a.dot, _mm256_mul_pd(dk, di));
    a.err = _mm256_add_pd(a.err, _mm256_mul_pd(e, e));
  }
}

// Adds 8 elements: w8 the base values, s8 the ideal fp32 result, r8 = s8 as stored.
inline void row_stats8(__m256 w8, __m256 s8, __m256 r8, RowSums& a, LaneCounts& c) {
  const __m256 fabs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 di = _mm256_sub_ps(s8, w8);
  const __m256 dk_all = _mm256_sub_ps(r8, w8);
  // NaN or inf in any of w, s, r makes di or dk NaN/inf, and so the sum of magnitudes, which
  // then fails the ordered compare.
  const __m256 mag = _mm256_add_ps(_mm256_and_ps(di, fabs_mask), _mm256_and_ps(dk_all, fabs_mask));
  if (_mm256_movemask_ps(_mm256_cmp_ps(mag, _mm256_set1_ps(0x1p48f), _CMP_LT_OQ)) != 0xff) {
    row_stats8_double(w8, s8, r8, a, c);
    return;
  }
  const __m256 upd = _mm256_cmp_ps(s8, w8, _CMP_NEQ_OQ);
  // Not updated (s == w): di is 0; dk may not be where the output dtype differs from the base's.
  const __m256 dk = _mm256_and_ps(dk_all, upd);
  const __m256 e = _mm256_sub_ps(dk, di);
  a.fnum = _mm256_fmadd_ps(dk, dk, a.fnum);
  a.fden = _mm256_fmadd_ps(di, di, a.fden);
  a.fdot = _mm256_fmadd_ps(dk, di, a.fdot);
  a.ferr = _mm256_fmadd_ps(e, e, a.ferr);
  c.updated = _mm256_sub_epi32(c.updated, _mm256_castps_si256(upd));
  c.lost = _mm256_sub_epi32(
      c.lost, _mm256_castps_si256(_mm256_and_ps(upd, _mm256_cmp_ps(r8, w8, _CMP_EQ_OQ))));
  if (++a.pending == RowSums::kFlush) flush_sums(a);
}

inline void row_stats_end(RowSums& a, Stats& st) {
  flush_sums(a);
  alignas(32) double v[4][4];
  _mm256_store_pd(v[0], a.num);
  _mm256_store_pd(v[1], a.den);
  _mm256_store_pd(v[2], a.dot);
  _mm256_store_pd(v[3], a.err);
  st.num += (v[0][0] + v[0][1]) + (v[0][2] + v[0][3]);
  st.den += (v[1][0] + v[1][1]) + (v[1][2] + v[1][3]);
  st.dot += (v[2][0] + v[2][1]) + (v[2][2] + v[2][3]);
  st.err += (v[3][0] + v[3][1]) + (v[3][2] + v[3][3]);
}

// Moves the counts into st and clears them.
inline void add_counts(LaneCounts& c, Stats& st) {
  st.updated += simd::sum_u32x8(c.updated);
  st.lost += simd::sum_u32x8(c.lost);
  st.base_nonfinite += c.elements - simd::sum_u32x8(c.w_ok);
  st.nonfinite += c.elements - simd::sum_u32x8(c.r_ok);
  c = LaneCounts{};
}
#endif

// Fidelity sums of one row: w0 the base values, s the ideal fp32 result, r = s as stored.
inline void row_stats(const float* w0, const float* s, const float* r, int64_t n, Stats& st) {
  int64_t k = 0;
#if defined(__AVX2__)
  {
    RowSums a;
    LaneCounts c;
    for (; k + 8 <= n; k += 8)
      row_stats8(_mm256_loadu_ps(w0 + k), _mm256_loadu_ps(s + k), _mm256_loadu_ps(r + k), a, c);
    row_stats_end(a, st);
    add_counts(c, st);
  }
#endif
  for (; k < n; ++k) {
    const double d_ideal = double(s[k]) - double(w0[k]);
    if (!std::isfinite(w0[k])) ++st.base_nonfinite;
    if (!std::isfinite(r[k])) ++st.nonfinite;
    if (d_ideal != 0.0 && std::isfinite(d_ideal)) {
      const double d_kept = double(r[k]) - double(w0[k]);
      st.num += d_kept * d_kept;
      st.den += d_ideal * d_ideal;
      st.dot += d_kept * d_ideal;
      st.err += (d_kept - d_ideal) * (d_kept - d_ideal);
      ++st.updated;
      if (r[k] == w0[k]) ++st.lost;
    }
  }
}

// Rows [i0, i1) of a tensor from its source bytes into the output rows, adding their sums.
using FusedRows = void (*)(const std::byte* src, const PreparedLora& p, int64_t cols, int64_t i0,
                           int64_t i1, std::byte* out, Stats& st);

#if defined(__AVX2__) && defined(__FMA__) && NANSCOPE_HAVE_AVX2_F16C
// The common case in one pass, for a weight with exactly one plain LoRA (no DoRA, bias, token
// rows or replacement) and cols % 8 == 0: W' = round(W + fl(fl(L@R) * scale)) row by row.
// The generic path runs B@A a whole row at a time (one row of L against all of R, up to 200 KB,
// past L1) and passes each row through four fp32 scratch arrays. Here B@A is computed in tiles
// of 4 rows x 24 columns held in 12 accumulators: each loaded slice of R serves 4 rows and each
// broadcast of L 3 vectors, so the FMAs, not the loads, set the pace, and 12 independent chains
// cover the FMA latency. Each finished tile goes from the accumulators through scale, add,
// rounding, store and the fidelity sums in registers. Same fused multiply-adds in the same k
// order and the same roundings as the generic path; each row's sums are fed in column order into
// that row's own accumulators: bit-identical output and statistics.
template <DType S, DType O>
class FusedLora {
 public:
  static constexpr size_t kSrcEs = S == DType::F32 ? 4 : 2;
  static constexpr size_t kOutEs = O == DType::F32 ? 4 : 2;
  static constexpr int64_t kGroup = 8;  // rows sharing each slice of R while it is in L1

  FusedLora(const std::byte* src, const PreparedLora& p, int64_t cols, int64_t i0, std::byte* out)
      : src_(src), p_(p), cols_(cols), i0_(i0), out_(out), scale_(_mm256_set1_ps(p.scale)) {}

  // Rows [i0, i1): out holds row i0 first.
  void rows(int64_t i1, Stats& st) {
    for (int64_t g0 = i0_; g0 < i1; g0 += kGroup) {
      const int64_t g1 = std::min(i1, g0 + kGroup);
      for (auto& a : sums_) a = RowSums{};
      prefetch_rows(g1, std::min(i1, g1 + kGroup));
      int64_t j0 = 0;
      for (; j0 + 24 <= cols_; j0 += 24) tiles<3>(g0, g1, j0);
      for (; j0 < cols_; j0 += 8) tiles<1>(g0, g1, j0);
      for (int64_t i = g0; i < g1; ++i) row_stats_end(sums_[i - g0], st);
      add_counts(counts_, st);
    }
  }

 private:
  // The base rows of the next group, into the cache while this group computes: read once each
  // in 48-byte steps of four rows at a time, they would otherwise stall every tile on memory.
  void prefetch_rows(int64_t b, int64_t e) const {
    const char* p = reinterpret_cast<const char*>(src_ + size_t(b * cols_) * kSrcEs);
    const char* end = reinterpret_cast<const char*>(src_ + size_t(e * cols_) * kSrcEs);
    for (; p < end; p += 64) _mm_prefetch(p, _MM_HINT_T0);
  }

  template <int C>
  void tiles(int64_t g0, int64_t g1, int64_t j0) {
    int64_t i = g0;
    for (; i + 4 <= g1; i += 4) tile<4, C>(i, g0, j0);
    for (; i < g1; ++i) tile<1, C>(i, g0, j0);
  }

  // Rows [i, i + M) x columns [j0, j0 + 8 C).
  template <int M, int C>
  void tile(int64_t i, int64_t g0, int64_t j0) {
    const int64_t r = p_.r;
    const float* L = p_.L.data() + i * r;
    const float* R = p_.R.data() + j0;
    // The accumulators live in registers only if every index is a constant after unrolling;
    // the products leave them through one store each.
    __m256 a[M][C];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) a[m][c] = _mm256_setzero_ps();
    for (int64_t k = 0; k < r; ++k) {
      __m256 rv[C];
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) rv[c] = _mm256_loadu_ps(R + k * cols_ + 8 * c);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const __m256 l = _mm256_broadcast_ss(L + m * r + k);
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) a[m][c] = _mm256_fmadd_ps(l, rv[c], a[m][c]);
      }
    }
    alignas(32) float prod[M][C][8];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) _mm256_store_ps(prod[m][c], a[m][c]);
    LaneCounts counts = counts_;  // in registers for the tile, not read-modify-written
    for (int m = 0; m < M; ++m) {
      RowSums rs = sums_[i + m - g0];
      for (int c = 0; c < C; ++c)
        finish8(_mm256_load_ps(prod[m][c]), i + m, j0 + 8 * c, rs, counts);
      sums_[i + m - g0] = rs;
    }
    counts_ = counts;
  }

  // W0 + fl(P * scale) for 8 elements of row i at column j: stored, and added to the sums.
  void finish8(__m256 prod, int64_t i, int64_t j, RowSums& a, LaneCounts& counts) {
    const __m256 w = load8(src_ + size_t(i * cols_ + j) * kSrcEs);
    const __m256 s = _mm256_add_ps(w, _mm256_mul_ps(prod, scale_));
    const __m256 stored = store8(s, out_ + size_t((i - i0_) * cols_ + j) * kOutEs);
    row_stats8(w, s, stored, a, counts);
  }

  static __m256 load8(const std::byte* q) {
    if constexpr (S == DType::BF16) return simd::load_bf16x8(q);
    if constexpr (S == DType::F16) return simd::load_f16x8(q);
    if constexpr (S == DType::F32) return _mm256_loadu_ps(reinterpret_cast<const float*>(q));
  }
  // Stores 8 values in the output dtype; returns them as a reader of the file sees them.
  static __m256 store8(__m256 v, std::byte* q) {
    if constexpr (O == DType::BF16) {
      const __m128i h = simd::to_bf16x8(v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), h);
      return simd::widen_bf16x8(h);
    }
    if constexpr (O == DType::F16) {
      const __m128i h = simd::to_f16x8(v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), h);
      return simd::widen_f16x8(h);
    }
    if constexpr (O == DType::F32) {
      _mm256_storeu_ps(reinterpret_cast<float*>(q), v);
      return v;
    }
  }

  const std::byte* src_;
  const PreparedLora& p_;
  int64_t cols_, i0_;
  std::byte* out_;
  __m256 scale_;
  RowSums sums_[kGroup];
  LaneCounts counts_;
};

template <DType S, DType O>
void fused_lora_rows(const std::byte* src, const PreparedLora& p, int64_t cols, int64_t i0,
                     int64_t i1, std::byte* out, Stats& st) {
  FusedLora<S, O>(src, p, cols, i0, out).rows(i1, st);
}

FusedRows fused_lora_kernel(DType src, DType out) {
  auto pick = [&]<DType S>() -> FusedRows {
    switch (out) {
      case DType::BF16:
        return &fused_lora_rows<S, DType::BF16>;
      case DType::F16:
        return &fused_lora_rows<S, DType::F16>;
      case DType::F32:
        return &fused_lora_rows<S, DType::F32>;
      default:
        return nullptr;
    }
  };
  switch (src) {
    case DType::BF16:
      return pick.template operator()<DType::BF16>();
    case DType::F16:
      return pick.template operator()<DType::F16>();
    case DType::F32:
      return pick.template operator()<DType::F32>();
    default:
      return nullptr;
  }
}
#endif

// Asks the kernel to read a mapped range ahead (whole pages inside it).
void prefetch(std::span<const std::byte> bytes) {
  if (bytes.empty()) return;
  static const uintptr_t ps = uintptr_t(::sysconf(_SC_PAGESIZE));
  const uintptr_t lo = reinterpret_cast<uintptr_t>(bytes.data()) & ~(ps - 1);
  const uintptr_t hi = reinterpret_cast<uintptr_t>(bytes.data() + bytes.size());
  ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_WILLNEED);
}

class Merger {
 public:
  Merger(const MergeOptions& o, const Checkpoint& base, const Adapter& ad, int threads)
      : o_(o), base_(base), ad_(ad), pool_(threads), scratch_(size_t(pool_.size())) {}

  void check_cancel() const {
    if (o_.cancel && o_.cancel->load()) fail("merge: interrupted; nothing was written");
  }

  // Computes one output tensor into the writer's buffers. Returns its statistics.
  Stats run(const OutTensor& t, SafetensorsWriter& w) {
    Stats st;
    const TensorInfo& src_info = t.replace ? *t.replace : *t.source.info;
    const std::byte* src = t.replace ? ad_.file().data(*t.replace).data() : t.source.bytes().data();
    const DType src_dtype = src_info.dtype;
    const uint64_t numel = src_info.numel();
    const bool is_float = is_float_computable(src_dtype);

    if (!t.touched() && (!is_float || src_dtype == t.dtype)) {
      // Unchanged bytes: copied from the mapping into the writer's chunks by all threads,
      // counting NaN/inf on the way. Element e is counted by the piece that holds its first
      // byte, so that an element split by a chunk's end is counted once.
      const std::span<const std::byte> bytes = t.source.bytes();
      const size_t es = is_float ? size_t(dtype_bits(src_dtype) / 8) : 1;
      std::vector<uint64_t> bad(size_t(pool_.size()), 0);
      for (size_t off = 0; off < bytes.size();) {
        check_cancel();
        const std::span<std::byte> room = w.room(bytes.size() - off);
        pool_.parallel_rows(int64_t(room.size()), [&](int64_t b, int64_t e, int tid) {
          std::memcpy(room.data() + b, bytes.data() + off + size_t(b), size_t(e - b));
          if (!is_float) return;
          const size_t e0 = (off + size_t(b) + es - 1) / es, e1 = (off + size_t(e) + es - 1) / es;
          bad[size_t(tid)] += count_nonfinite(bytes.subspan(e0 * es), src_dtype, e1 - e0);
        });
        w.advance(room.size());
        off += room.size();
      }
      for (uint64_t n : bad) st.base_nonfinite += n;
      st.nonfinite = st.base_nonfinite;
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
        // dW = P * scale rounded on its own, then W + dW: two roundings, as torch does them
        // (two kernels). In one expression GCC fuses them into one FMA (C++ defaults to
        // -ffp-contract=fast), which differs from peft whenever P * scale is not exact, i.e.
        // for a scale that is not a power of two. Separate loops keep them apart.
        for (int64_t j = 0; j < cols; ++j) tmp[j] = tmp[j] * p.scale;
        if (p.round_delta)
          for (int64_t j = 0; j < cols; ++j) tmp[j] = round_to(tmp[j], out);
        for (int64_t j = 0; j < cols; ++j) Srow[j] = Srow[j] + tmp[j];
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

    for (auto& sc : scratch_) {
      if (sc.w0.size() < size_t(cols)) {
        sc.w0.resize(size_t(cols));
        sc.s.resize(size_t(cols));
        sc.r.resize(size_t(cols));
        sc.tmp.resize(size_t(cols));
      }
    }
    FusedRows fused = nullptr;
#if defined(__AVX2__) && defined(__FMA__) && NANSCOPE_HAVE_AVX2_F16C
    if (lora.size() == 1 && lora[0].magnitude.empty() && !lora[0].round_delta &&
        bias_delta.empty() && !t.rows && !t.replace && cols % 8 == 0)
      fused = fused_lora_kernel(src_dtype, out);
#endif
    std::vector<Stats> part(scratch_.size());
    const size_t row_bytes = size_t(cols) * out_es;
    // Rows [i0, i1) into dst (row i0 first) on worker tid, adding to that worker's sums. Row by
    // row, each row's whole pipeline in cache: W0, + each update, DoRA, bias, the fidelity of
    // the stored values, token rows.
    auto compute_rows = [&](int64_t i0, int64_t i1, std::byte* dst, int tid) {
      if (i0 >= i1) return;
      if (fused) {
        fused(src, lora[0], cols, i0, i1, dst, part[size_t(tid)]);
        return;
      }
      Scratch& sc = scratch_[size_t(tid)];
      float* w0 = sc.w0.data();
      float* s = sc.s.data();
      float* rr = sc.r.data();
      Stats& ps = part[size_t(tid)];
      for (int64_t i = i0; i < i1; ++i) {
        load_block(i, i + 1, w0);
        load_block(i, i + 1, s);  // cheaper than a memcpy of w0 (which perf showed at 20%)
        for (const auto& p : lora) {
          add_update(p, i, i + 1, s, sc.tmp.data());
          if (p.magnitude.empty()) continue;
          // DoRA (lora/variants.py merge_unsafe): norm of W + dW, factor m / norm, then
          // factor * (W + dW), all fp32, rounded once. Row norms for linear layers.
          if (p.dora_columns) {
            for (int64_t j = 0; j < cols; ++j) s[j] = p.col_factor[size_t(j)] * s[j];
          } else {
            double sq = 0;
            for (int64_t j = 0; j < cols; ++j) sq += double(s[j]) * double(s[j]);
            const float f = p.magnitude[size_t(i)] / float(std::sqrt(sq));
            for (int64_t j = 0; j < cols; ++j) s[j] = f * s[j];
          }
        }
        if (!bias_delta.empty())
          for (int64_t j = 0; j < cols; ++j) s[j] = s[j] + bias_delta[size_t(i * cols + j)];
        std::byte* orow = dst + size_t(i - i0) * row_bytes;
        store_from_f32(s, out, orow, size_t(cols));
        load_to_f32(orow, out, rr, size_t(cols));  // the values as stored
        row_stats(w0, s, rr, cols, ps);
        if (t.rows) {
          auto it = token_row.find(i);
          if (it != token_row.end())
            store_from_f32(token_values.data() + size_t(it->second * cols), out, orow,
                           size_t(cols));
        }
      }
    };
    std::vector<std::byte> spill;
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      check_cancel();
      const int64_t r1 = std::min(rows, r0 + block);
      const int64_t n = r1 - r0;
      const size_t bytes = size_t(n) * row_bytes;
      // The block's rows go straight into the writer's chunks: rows [r0, r0 + x) into the
      // current one, the rest into the next, and the row across the chunks' border (if any)
      // through a spill buffer. The rows are split among the workers exactly as before, whatever
      // the borders, so that each worker's fidelity sums see the same rows in the same order.
      if (bytes > w.chunk_size()) {  // a row longer than a chunk (a huge 1-D tensor)
        spill.resize(bytes);
        pool_.parallel_rows(n, [&](int64_t b, int64_t e, int tid) {
          compute_rows(r0 + b, r0 + e, spill.data() + size_t(b) * row_bytes, tid);
        });
        w.write(spill);
        continue;
      }
      const auto [first, second] = w.reserve(bytes);
      const int64_t x = int64_t(first.size() / row_bytes);
      const size_t cut = first.size() % row_bytes;  // bytes of row r0 + x in the first chunk
      const int64_t after = x + (cut ? 1 : 0);      // first row wholly in the second chunk
      spill.resize(row_bytes);
      pool_.parallel_rows(n, [&](int64_t b, int64_t e, int tid) {
        if (b < x)
          compute_rows(r0 + b, r0 + std::min(e, x), first.data() + size_t(b) * row_bytes, tid);
        if (cut && b <= x && x < e) compute_rows(r0 + x, r0 + x + 1, spill.data(), tid);
        const int64_t b2 = std::max(b, after);
        if (b2 < e)
          compute_rows(r0 + b2, r0 + e, second.data() + (size_t(b2) * row_bytes - first.size()),
                       tid);
      });
      if (cut) {
        std::memcpy(first.data() + size_t(x) * row_bytes, spill.data(), cut);
        std::memcpy(second.data(), spill.data() + cut, row_bytes - cut);
      }
      w.advance(bytes);
    }
    for (const auto& ps : part) st.add(ps);
    if (t.rows) {  // token rows replaced after the scan: count their NaN/inf too
      for (float v : token_values)
        if (!std::isfinite(round_to(v, out))) ++st.nonfinite;
    }
    t.source.release();  // the result is in the writer's buffers
    return st;
  }

 private:
  struct Scratch {
    std::vector<float> w0, s, r, tmp;  // one row each
  };
  const MergeOptions& o_;
  const Checkpoint& base_;
  const Adapter& ad_;
  Pool pool_;
  std::vector<Scratch> scratch_;
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
  guard.path = claim_temporary(parent / out.filename());  // removes stale ones, registers it
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
    SafetensorsWriter w(guard.path / sh.file, specs, {{"format", "pt"}},
                        {.direct = o.durable, .durable = o.durable});
    for (size_t k = 0; k < sh.tensors.size(); ++k) {
      const size_t i = sh.tensors[k];
      if (k + 1 < sh.tensors.size()) {  // the next tensor's base bytes, read ahead
        const OutTensor& nt = tensors[sh.tensors[k + 1]];
        prefetch(nt.source.bytes());
      }
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
    write_file_atomic(guard.path / "model.safetensors.index.json", idx.dump(2) + "\n", o.durable);
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
    write_file_atomic(guard.path / "config.json", c.dump(2) + "\n", o.durable);
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
    if (o.durable) fsync_path(guard.path / f);
    res.side_files.push_back(f);
  }
  // Durable: every file above and the directory's entries before the rename, the rename after
  // it (a power cut must not leave a renamed directory with an empty config.json).
  if (o.durable) fsync_path(guard.path);

  merger.check_cancel();
  if (fs::exists(out, ec)) fs::remove(out, ec);  // an empty directory: checked above
  fs::rename(guard.path, out, ec);
  if (ec)
    throw OutputError(fmt::format("{}: cannot rename to {} ({})", guard.path.string(), out.string(),
                                  ec.message()));
  guard.keep = true;
  if (o.durable) fsync_dir_quietly(parent);
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
