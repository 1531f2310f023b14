// The merge itself: each output tensor computed from its plan (merge_plan.cpp) with the row
// kernels of numerics/lora_kernels.cpp, streamed into the safetensors writer; the result's JSON.
#include "tools/merge.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "common/interrupt_check.hpp"
#include "common/strings.hpp"
#include "formats/adapter.hpp"
#include "formats/checkpoint.hpp"
#include "formats/safetensors.hpp"
#include "numerics/lora_kernels.hpp"
#include "numerics/parallel.hpp"
#include "numerics/stats.hpp"
#include "tools/merge_plan.hpp"

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
  if (ascii_lower(s) == "auto") return std::nullopt;
  if (const auto t = parse_float_dtype(s)) return t;
  fail_usage("merge: --dtype {}: expected auto (the base's dtype) or {}", s,
             float_dtype_spellings());
}

namespace {

std::vector<float> load_all_f32(const SafetensorsFile& f, const TensorInfo& t) {
  std::vector<float> v(t.numel());
  load_to_f32(f.data(t).data(), t.dtype, v.data(), v.size());
  return v;
}

// A LoRA update prepared for row-wise evaluation: dW[i, :] = fl(P[i, :] * scale).
struct PreparedLora : LowRankFactors {
  std::vector<float> magnitude;   // DoRA
  bool dora_columns = false;      // DoRA on an embedding: norms over columns (pass 1)
  std::vector<float> col_factor;  // filled by pass 1
  bool round_delta = false;       // peft's embedding double rounding
};

PreparedLora prepare(const LoraModule& m, const SafetensorsFile& f, bool fan_in_fan_out,
                     bool peft_embedding_rounding) {
  PreparedLora p;
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
    check_interrupt();
    if (o_.cancel && o_.cancel->load()) fail("merge: interrupted; nothing was written");
  }

  // Computes one output tensor into the writer's buffers. Returns its statistics.
  FidelitySums run(const OutTensor& t, SafetensorsWriter& w) {
    FidelitySums st;
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
        pool_.parallel_pieces(int64_t(room.size()), [&](int64_t b, int64_t e, int tid) {
          std::memcpy(room.data() + b, bytes.data() + off + size_t(b), size_t(e - b));
          if (!is_float) return;
          const size_t e0 = (off + size_t(b) + es - 1) / es, e1 = (off + size_t(e) + es - 1) / es;
          bad[size_t(tid)] += value_stats(bytes.data() + e0 * es, e1 - e0, src_dtype).nonfinite();
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
    if (lora.size() == 1 && lora[0].magnitude.empty() && !lora[0].round_delta &&
        bias_delta.empty() && !t.rows && !t.replace && cols % 8 == 0)
      fused = fused_lora_kernel(src_dtype, out);
    std::vector<FidelitySums> part(scratch_.size());
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
      FidelitySums& ps = part[size_t(tid)];
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
        pool_.parallel_pieces(n, [&](int64_t b, int64_t e, int tid) {
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
      pool_.parallel_pieces(n, [&](int64_t b, int64_t e, int tid) {
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
  BlockingPool pool_;  // numerics/parallel.hpp: sleeps while the writer works
  std::vector<Scratch> scratch_;
};

// What to do about a merged tensor that came out non-finite from a finite base and adapter.
std::string arithmetic_fix(const OutTensor& t, const FidelitySums& st) {
  if (st.ideal_nonfinite == 0) {  // W + dW is finite in fp32: a dtype with fp32's range holds it
    if (t.dtype == DType::F16)
      return "merge into bf16 (--dtype bf16: the range of fp32 in the same size) or fp32 "
             "(--dtype fp32): every W + dW is finite in fp32, but beyond fp16's 65504";
    return fmt::format(
        "merge into fp32 (--dtype fp32): every W + dW is finite in fp32, but beyond {}'s range",
        dtype_cli_name(t.dtype));
  }
  std::vector<std::string> inputs;
  for (const LoraModule* m : t.lora)
    for (const TensorInfo* x : {m->A, m->B, m->magnitude})
      if (x) inputs.push_back(x->name);
  if (t.bias_of) inputs.push_back(t.bias_of->bias->name);
  return fmt::format(
      "look at the adapter tensor(s) {}: W + dW overflows even fp32 in {} element(s) of {}, so "
      "no dtype holds it (the update, lora_B @ lora_A times the scale, is beyond 3.4e38: a "
      "diverged training run?)",
      inputs.empty() ? std::string("of this update") : fmt::format("{}", fmt::join(inputs, ", ")),
      st.ideal_nonfinite, t.name);
}

// The fidelity figures in words (MergeResult::fidelity_verdict).
std::string fidelity_verdict(const MergeResult& r) {
  if (r.update_elements == 0) return "no update to keep (the adapter changes no weight)";
  if (!r.nonfinite.empty() || !std::isfinite(r.relative_error))
    return "not judged: the merged weights are not finite";
  if (r.relative_error == 0) return "update kept exactly";
  const int mantissa = r.out_dtype == DType::BF16 ? 8 : r.out_dtype == DType::F16 ? 11 : 24;
  const std::string dt = dtype_cli_name(r.out_dtype);
  if (r.relative_error <= std::ldexp(1.0, -mantissa))
    return fmt::format("update kept within {} rounding", dt);
  // Rounding W + dW into a coarse dtype adds noise (relative_error) that is mostly orthogonal
  // to the update: what is lost is the share missing along dW (1 - projected), typically the
  // elements below the dtype's resolution of W. Only that share is called lost.
  const double lost_share = 1.0 - r.projected;
  if (std::fabs(lost_share) <= 0.01)
    return fmt::format(
        "update kept (projected {:.3f}), with {} rounding noise of {:.2g}% of its size on top, as "
        "any {} copy of W + dW has: merge into fp32 (--dtype fp32) to avoid the noise",
        r.projected, dt, 100 * r.relative_error, dt);
  return fmt::format(
      "{:.2g}% of the update lost to rounding into {} ({} of {} updated elements kept the base "
      "value): merge into fp32 (--dtype fp32) or apply the adapter unmerged (--adapter) to keep it",
      100 * lost_share, dt, r.lost, r.update_elements);
}

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
  res.base_dtype = base.storage_dtype();
  res.out_dtype = o.dtype.value_or(res.base_dtype);
  if (!is_float_computable(res.out_dtype))
    fail("merge: output dtype {} is not bf16, fp16 or fp32", dtype_name(res.out_dtype));
  const int threads =
      o.threads > 0 ? o.threads : int(std::max(1u, std::thread::hardware_concurrency()));

  MergePlan plan = plan_merge(o, base, ad, res.out_dtype);
  res.base_tied = plan.base_tied;
  res.untied = plan.untied;
  res.tie_word_embeddings = plan.tie_word_embeddings;
  res.warnings = plan.warnings;
  const std::vector<OutTensor>& tensors = plan.tensors;
  const std::vector<Shard>& shards = plan.shards;

  // Build in "<out>.tmp-<pid>"; removed on any error, renamed into place on success.
  TmpDirGuard guard;
  guard.path = claim_temporary(parent / out.filename());  // removes stale ones, registers it
  fs::remove_all(guard.path, ec);
  if (!fs::create_directory(guard.path, ec))
    throw OutputError(fmt::format("{}: cannot create ({})", guard.path.string(), ec.message()));

  Merger merger(o, base, ad, threads);
  std::vector<TensorFidelity> fid;
  FidelitySums total;
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
      FidelitySums st = merger.run(t, w);
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
          if (plan.adapter.adapter_nonfinite.count(x->name)) nf.adapter_tensors.push_back(x->name);
        if (!nf.adapter_tensors.empty()) {
          nf.cause = "adapter";
          nf.detail = fmt::format("the adapter's own tensors hold NaN/inf: {}",
                                  fmt::join(nf.adapter_tensors, ", "));
          nf.fix = fmt::format(
              "look at the adapter tensor(s) {} in {}: no output dtype holds their NaN/inf "
              "(`nanscope scan {} --adapter {}` lists them; retrain, or save the adapter again "
              "from a finite state)",
              fmt::join(nf.adapter_tensors, ", "), o.adapter.string(), o.base.string(),
              o.adapter.string());
        } else if (st.base_nonfinite) {
          nf.cause = "base";
          nf.detail = fmt::format("the base tensor already holds {} NaN/inf", st.base_nonfinite);
          nf.fix = fmt::format(
              "use a base checkpoint whose {} is finite (`nanscope scan {}` lists the damage; "
              "download it again?)",
              t.name, o.base.string());
        } else {
          nf.cause = "arithmetic";
          nf.detail =
              fmt::format("base and adapter are finite; W + dW exceeds the range of {} (max {})",
                          dtype_cli_name(t.dtype), dtype_max(t.dtype));
          nf.fix = arithmetic_fix(t, st);
        }
        if (std::find(res.fixes.begin(), res.fixes.end(), nf.fix) == res.fixes.end())
          res.fixes.push_back(nf.fix);
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
  res.fidelity_verdict = fidelity_verdict(res);

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
  j["fidelity"] = {{"verdict", r.fidelity_verdict},
                   {"kept", r.kept},
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
                  {"detail", n.detail},
                  {"fix", n.fix}});
  j["nonfinite"] = nf;
  j["fixes"] = r.fixes;
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
        "REFUSED: the merged weights would hold NaN/inf in {} tensor(s); nothing was written\n",
        r.nonfinite.size());
  } else {
    s += fmt::format("wrote {} ({} shard(s), {}): {} merged, {} replaced, {} copied\n",
                     r.out.string(), r.shards.size(), dtype_cli_name(r.out_dtype), r.merged,
                     r.replaced, r.copied);
  }
  for (const auto& n : r.nonfinite)
    s += fmt::format("  {}: {} non-finite ({}): {}\n", n.tensor, n.count, n.cause, n.detail);
  // What to do first; the flag that writes the broken model anyway last.
  for (const auto& f : r.fixes) s += "fix: " + f + "\n";
  if (r.refused)
    s += "(--allow-nonfinite writes the model anyway, NaN/inf included: only to look at it)\n";
  else if (!r.nonfinite.empty())
    s += "written anyway (--allow-nonfinite): the model holds NaN/inf\n";
  s += fmt::format(
      "fidelity: {} (kept {:.6f}, projected {:.6f}, relative error {:.2e}; {} of {} updated "
      "elements lost entirely to rounding into {})\n",
      r.fidelity_verdict, r.kept, r.projected, r.relative_error, r.lost, r.update_elements,
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
