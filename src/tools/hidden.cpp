// The soft-input mixtures are summed with one rounding per product and per sum, as the torch
// reference (tools/fixtures/make_hidden_goldens.py) does: no contraction into FMA.
#pragma GCC optimize("fp-contract=off")

#include "tools/hidden.hpp"

#include "model/adapter_overlay.hpp"
#include "tools/hidden_read.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <fstream>
#include <functional>
#include <future>
#include <mutex>
#include <set>
#include <unordered_map>

#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "common/json_depth.hpp"
#include "common/temp_files.hpp"
#include "formats/safetensors.hpp"
#include "model/arch.hpp"
#include "numerics/kernels.hpp"
#include "numerics/parallel.hpp"
#include "numerics/stats.hpp"
#include "tools/trace.hpp"

namespace nanscope {

namespace fs = std::filesystem;
using nlohmann::json;

// ---- embeddings and states ----

std::vector<float> input_embeddings(const Checkpoint& ck, const HiddenInput& in, DType dt) {
  const int64_t H = ck.config().hidden_size, V = ck.config().vocab_size, T = in.tokens();
  const ModelSpec spec = model_spec(ck.config());
  const std::string embed = spec.embed + ".weight";
  const TensorRef e = ck.get(embed);
  const auto& s = e.info->shape;
  if (s.size() != 2 || s[0] != V || s[1] != H)
    fail("{}: {} has shape [{}], expected [{}, {}]", ck.dir().string(), embed, fmt::join(s, ", "),
         V, H);
  const WeightView w{e.bytes().data(), e.info->dtype, V, H};
  validate_input(in, InputRules{V, 0, true}, ck.dir().string());
  std::vector<float> out(size_t(T * H), 0.0f);
  std::vector<float> row(static_cast<size_t>(H));
  for (int64_t t = 0; t < T; ++t) {
    float* o = out.data() + t * H;
    auto sp = in.soft.find(t);
    if (sp == in.soft.end()) {
      weight_rows(w, in.ids[size_t(t)], 1, dt, o);
      continue;
    }
    for (const auto& [tok, p] : sp->second) {
      weight_rows(w, tok, 1, dt, row.data());
      for (int64_t c = 0; c < H; ++c) {
        const float prod = p * row[size_t(c)];
        o[c] = o[c] + prod;
      }
    }
  }
  round_inplace(out.data(), out.size(), dt);
  // Gemma scales its embeddings by sqrt(hidden_size) in the run dtype, as forward() does for
  // ids: a one-hot mixture stays exactly the discrete input.
  scale_embeddings(spec, out.data(), out.size(), dt);
  return out;
}

namespace {

// Hands each state asked for to the sink, input by input, as the batch's pass computes it:
// whole (no pools), or reduced per input for each pool (pooled_sink), by the GPU where the pass
// runs there (hidden_state_pooled), else here from the whole state.
class BatchObserver : public Observer {
 public:
  BatchObserver(std::span<const int64_t> layers, std::span<const int64_t> lengths,
                const StateSink& sink)
      : layers_(layers), lengths_(lengths), sink_(&sink) {}
  BatchObserver(std::span<const int64_t> layers, std::span<const int64_t> lengths,
                std::span<const Pool> pools, const PooledSink& sink)
      : layers_(layers), lengths_(lengths), pools_(pools), pooled_(&sink) {}
  void hidden_state(int64_t index, std::span<const float> v, int64_t T, int64_t H) override {
    (void)T;
    if (wants_state(index)) {
      int64_t off = 0;
      for (size_t b = 0; b < lengths_.size(); ++b) {
        const std::span<const float> st = v.subspan(size_t(off * H), size_t(lengths_[b] * H));
        if (pooled_ == nullptr) {
          (*sink_)(b, index, st);
        } else {
          const bool finite = all_finite(st);
          for (Pool p : pools_) (*pooled_)(b, index, p, pool_state(st, lengths_[b], H, p), finite);
        }
        off += lengths_[b];
      }
    }
    finished_ = index >= layers_.back();
  }
  void hidden_state_pooled(int64_t index, Pool pool, std::span<const float> rows,
                           std::span<const uint8_t> finite, int64_t H) override {
    if (wants_state(index))
      for (size_t b = 0; b < lengths_.size(); ++b)
        (*pooled_)(b, index, pool, rows.subspan(b * size_t(H), size_t(H)), finite[b] != 0);
    finished_ = index >= layers_.back();
  }
  bool wants_state(int64_t index) const override {
    return std::binary_search(layers_.begin(), layers_.end(), index);
  }
  std::span<const Pool> pools() const override { return pools_; }
  bool done() const override { return finished_; }
  bool wants_sites() const override { return false; }

 private:
  std::span<const int64_t> layers_, lengths_;
  std::span<const Pool> pools_;
  const StateSink* sink_ = nullptr;
  const PooledSink* pooled_ = nullptr;
  bool finished_ = false;
};

void check_layers(std::span<const int64_t> layers, int64_t num_states) {
  for (int64_t l : layers)
    if (l < 0 || l >= num_states)
      fail("hidden state {} does not exist: the model has states 0..{}", l, num_states - 1);
}

// `layers` checked against the model's states; empty = all of them.
std::vector<int64_t> wanted_states(std::span<const int64_t> layers, int64_t num_states) {
  check_layers(layers, num_states);
  if (!layers.empty()) return {layers.begin(), layers.end()};
  std::vector<int64_t> all(static_cast<size_t>(num_states));
  for (int64_t i = 0; i < num_states; ++i) all[size_t(i)] = i;
  return all;
}

// The states of one sequence of T tokens, kept whole; `run(observer)` runs the pass.
template <typename Run>
HiddenStates collect(const Checkpoint& ck, int64_t T, std::span<const int64_t> layers, Run&& run) {
  const int64_t S = ck.config().num_hidden_layers + 1;
  const std::vector<int64_t> wanted = wanted_states(layers, S);
  HiddenStates out;
  out.T = T, out.H = ck.config().hidden_size;
  out.states.resize(size_t(S));
  const StateSink keep = [&](size_t, int64_t k, std::span<const float> st) {
    out.states[size_t(k)].assign(st.begin(), st.end());
  };
  BatchObserver obs(wanted, std::span<const int64_t>(&T, 1), keep);
  run(&obs);
  return out;
}

}  // namespace

namespace {

// A batch member's input embeddings: token ids as forward() embeds them (with an adapter, its
// embedding LoRA, trainable tokens and saved table apply: PeftModel's embedding layer), soft
// positions as input_embeddings mixes them (inputs_embeds: no embedding layer runs).
std::vector<float> batch_embeddings(const Checkpoint& ck, const HiddenInput& in,
                                    const ForwardOptions& fwd) {
  if (fwd.adapter != nullptr && !in.has_soft()) {
    validate_input(in, InputRules{ck.config().vocab_size, 0, true}, ck.dir().string());
    return embed_ids(ck, in.ids, fwd);
  }
  return input_embeddings(ck, in, fwd.dtype);
}

// One batch's pass: on the GPU, inputs of ids alone (no soft token) go as ids
// (forward_batch_ids: gathered there where the GPU holds the table, else embedded as forward()
// does); otherwise the host's embeddings of each input, stacked.
void run_batch(const Checkpoint& ck, std::span<const HiddenInput* const> inputs,
               std::span<const int64_t> lengths, const ForwardOptions& fwd, Observer* obs) {
  const bool soft = std::any_of(inputs.begin(), inputs.end(),
                                [](const HiddenInput* in) { return in->has_soft(); });
  if (fwd.device == Device::Cuda && !soft) {
    std::vector<int64_t> ids;
    for (const HiddenInput* in : inputs) {
      validate_input(*in, InputRules{ck.config().vocab_size, 0, true}, ck.dir().string());
      ids.insert(ids.end(), in->ids.begin(), in->ids.end());
    }
    forward_batch_ids(ck, ids, lengths, fwd, obs);
    return;
  }
  std::vector<float> embeddings;
  for (const HiddenInput* in : inputs) {
    const std::vector<float> e = batch_embeddings(ck, *in, fwd);
    embeddings.insert(embeddings.end(), e.begin(), e.end());
  }
  forward_batch(ck, embeddings, lengths, fwd, obs);
}

}  // namespace

HiddenStates hidden_states(const Checkpoint& ck, const HiddenInput& in, const ForwardOptions& fwd,
                           std::span<const int64_t> layers) {
  if (!in.has_soft()) {
    return collect(ck, in.tokens(), layers, [&](Observer* o) { forward(ck, in.ids, fwd, o); });
  }
  const std::vector<float> e = input_embeddings(ck, in, fwd.dtype);
  return hidden_states_embeddings(ck, e, in.tokens(), fwd, layers);
}

HiddenStates hidden_states_embeddings(const Checkpoint& ck, std::span<const float> embeddings,
                                      int64_t T, const ForwardOptions& fwd,
                                      std::span<const int64_t> layers) {
  return collect(ck, T, layers,
                 [&](Observer* o) { forward_embeddings(ck, embeddings, T, fwd, o); });
}

void hidden_states_batch(const Checkpoint& ck, std::span<const HiddenInput* const> inputs,
                         const ForwardOptions& fwd, std::span<const int64_t> layers,
                         const StateSink& sink) {
  if (inputs.empty()) return;
  const std::vector<int64_t> wanted = wanted_states(layers, ck.config().num_hidden_layers + 1);
  std::vector<int64_t> lengths;
  for (const HiddenInput* in : inputs) lengths.push_back(in->tokens());
  BatchObserver obs(wanted, lengths, sink);
  run_batch(ck, inputs, lengths, fwd, &obs);
}

void hidden_states_pooled(const Checkpoint& ck, std::span<const HiddenInput* const> inputs,
                          const ForwardOptions& fwd, std::span<const int64_t> layers,
                          std::span<const Pool> pools, const PooledSink& sink) {
  if (inputs.empty()) return;
  for (Pool p : pools)
    if (p == Pool::None) throw std::logic_error("hidden_states_pooled: Pool::None");
  const std::vector<int64_t> wanted = wanted_states(layers, ck.config().num_hidden_layers + 1);
  std::vector<int64_t> lengths;
  for (const HiddenInput* in : inputs) lengths.push_back(in->tokens());
  BatchObserver obs(wanted, lengths, pools, sink);
  run_batch(ck, inputs, lengths, fwd, &obs);
}

std::vector<std::pair<size_t, size_t>> batch_ranges(std::span<const int64_t> tokens,
                                                    int64_t batch_tokens) {
  std::vector<std::pair<size_t, size_t>> out;
  for (size_t b = 0; b < tokens.size();) {
    size_t e = b + 1;
    int64_t sum = tokens[b];
    while (e < tokens.size() && sum + tokens[e] <= batch_tokens) sum += tokens[e++];
    out.emplace_back(b, e);
    b = e;
  }
  return out;
}

std::optional<Pool> parse_pool(std::string_view s) {
  if (s == "none") return Pool::None;
  if (s == "last") return Pool::Last;
  if (s == "mean") return Pool::Mean;
  return std::nullopt;
}

std::string_view pool_name(Pool p) {
  switch (p) {
    case Pool::Last:
      return "last";
    case Pool::Mean:
      return "mean";
    default:
      return "none";
  }
}

std::vector<float> pool_state(std::span<const float> state, int64_t T, int64_t H, Pool p) {
  if (p == Pool::None) return {state.begin(), state.end()};
  if (p == Pool::Last) return {state.begin() + (T - 1) * H, state.begin() + T * H};
  std::vector<float> m(size_t(H), 0.0f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < H; ++c) m[size_t(c)] += state[size_t(t * H + c)];
  const float n = float(T);
  for (float& x : m) x = x / n;
  return m;
}

std::vector<int64_t> parse_layers(std::string_view s, int64_t num_states) {
  std::vector<int64_t> out;
  if (s == "all" || s.empty()) {
    for (int64_t i = 0; i < num_states; ++i) out.push_back(i);
    return out;
  }
  // Comma-separated, spaces around items allowed; an empty item is an error, not skipped.
  for (size_t b = 0;;) {
    const size_t e = std::min(s.find(',', b), s.size());
    std::string_view item = s.substr(b, e - b);
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
    int64_t v = 0;
    auto [p, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    if (item.empty() || ec != std::errc() || p != item.data() + item.size())
      fail_usage(
          "--layers {}: expected \"all\" or comma-separated state indices like 0,5,36 (item {} "
          "is \"{}\")",
          s, out.size() + 1, item);
    if (v < 0) v += num_states;
    if (v < 0 || v >= num_states)
      fail(
          "--layers {}: state {} does not exist: the model has states 0..{} (N+1 states, as "
          "output_hidden_states)",
          s, item, num_states - 1);
    out.push_back(v);
    if (e == s.size()) break;
    b = e + 1;
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

// ---- the run over a jsonl ----

namespace {

constexpr const char* kFormat = "nanscope-hidden/1";

std::string shard_name(int64_t n) {
  return fmt::format("hidden-{:05d}.safetensors", n);
}

struct Pending {
  std::string id;
  int64_t input_index = 0;  // position in the input file
  int64_t tokens = 0;
  std::string kind;
  // (layer, values in the output dtype's bytes: converted as each state arrives, so that the
  // writer only writes and a batch holds the written size, not fp32)
  std::vector<std::pair<int64_t, std::vector<std::byte>>> tensors;
  std::vector<int64_t> shape;
  std::vector<int64_t> nonfinite;
};

json settings_json(const HiddenRunOptions& opt, const std::vector<int64_t>& layers, DType out_dt,
                   const Checkpoint& ck) {
  std::error_code ec;
  fs::path model = fs::weakly_canonical(opt.model, ec);
  if (ec) model = opt.model;
  json s{{"model", model.string()},
         {"dtype", run_dtype_name(opt.fwd.dtype)},
         {"attention", attention_name(opt.fwd.attention)},
         {"layers", layers},
         {"pool", pool_name(opt.pool)},
         {"out_dtype", dtype_name(out_dt)},
         {"hidden_size", ck.config().hidden_size},
         {"num_states", ck.config().num_hidden_layers + 1}};
  // Only with a shard: indexes of unsharded runs stay as they were, and resume as before.
  if (opt.shard) s["slice"] = {{"index", opt.shard->index}, {"count", opt.shard->count}};
  if (opt.adapter) {  // only with one: indexes of runs without stay as they were
    fs::path a = fs::weakly_canonical(*opt.adapter, ec);
    s["adapter"] = (ec ? *opt.adapter : a).string();
  }
  return s;
}

}  // namespace

Slice parse_slice(std::string_view s) {
  const size_t slash = s.find('/');
  Slice r;
  auto num = [](std::string_view x, int64_t& v) {
    auto [p, ec] = std::from_chars(x.data(), x.data() + x.size(), v);
    return !x.empty() && ec == std::errc() && p == x.data() + x.size();
  };
  if (slash == std::string_view::npos || !num(s.substr(0, slash), r.index) ||
      !num(s.substr(slash + 1), r.count))
    fail("--shard {}: expected K/N, the K-th (0-based) of N slices, e.g. 0/4", s);
  if (r.count < 1 || r.count > 99999) fail("--shard {}: N must be between 1 and 99999", s);
  if (r.index < 0 || r.index >= r.count)
    fail(
        "--shard {}: K must be in 0..{} (0-based; with Slurm, --array=0-{} and "
        "--shard $SLURM_ARRAY_TASK_ID/{})",
        s, r.count - 1, r.count - 1, r.count);
  return r;
}

std::string slice_dir_name(Slice s) {
  return fmt::format("slice-{:05d}-of-{:05d}", s.index, s.count);
}

HiddenRunSummary run_hidden(const HiddenRunOptions& opt) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  Checkpoint ck = Checkpoint::open(opt.model);
  const std::shared_ptr<const AdapterOverlay> overlay =
      opt.adapter ? AdapterOverlay::open(*opt.adapter, ck) : nullptr;
  const int64_t S = ck.config().num_hidden_layers + 1, H = ck.config().hidden_size;
  const std::vector<int64_t> layers = parse_layers(opt.layers, S);
  if (opt.batch_tokens <= 0) fail("--batch-tokens {}: must be positive", opt.batch_tokens);
  const DType out_dt = opt.out_run_dtype ? opt.fwd.dtype : DType::F32;

  InputRules rules = opt.rules;
  rules.vocab_size = ck.config().vocab_size;
  const fs::path tok = opt.tokenizer.empty() ? opt.model : opt.tokenizer;
  // Every line is read and checked, whatever the slice: all slices see the same file, and a bad
  // line stops every slice before any compute.
  const std::vector<HiddenInput> all_inputs = read_hidden_inputs(opt.input, tok, rules);
  std::vector<std::pair<int64_t, const HiddenInput*>> inputs;  // (position in the file, input)
  for (size_t i = 0; i < all_inputs.size(); ++i)
    if (!opt.shard || int64_t(i) % opt.shard->count == opt.shard->index)
      inputs.emplace_back(int64_t(i), &all_inputs[i]);

  const fs::path out = opt.shard ? opt.out / slice_dir_name(*opt.shard) : opt.out;
  HiddenRunSummary sum;
  sum.out = out;
  sum.index = out / "index.json";
  sum.inputs = int64_t(inputs.size());

  // The parent of slices holds them and, at most, their merged index (hidden --merge-index);
  // a merged index is no run to resume.
  const fs::path parent_index = opt.out / "index.json";
  if (fs::exists(parent_index)) {
    const bool merged = is_merged_index(parent_index);
    if (opt.shard && !merged)
      fail("{}: holds the output of an unsharded run; give --shard runs another --out",
           parent_index.string());
    if (!opt.shard && merged)
      fail(
          "{}: is a merged index of slices (hidden --merge-index), not a run to resume; rerun "
          "with the same --shard into the same --out, or use another --out",
          parent_index.string());
  }

  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec) throw OutputError(fmt::format("{}: {}", out.string(), ec.message()));
  // Shards and index temporaries of an earlier run that was killed.
  for (const StaleTemporary& t : remove_stale_temporaries_in(out, [](std::string_view b) {
         return b == "index.json" || (b.starts_with("hidden-") && b.ends_with(".safetensors"));
       }))
    notice(describe(t));

  // The index: settings, shards, and per input its file. Resuming checks the settings agree.
  const json settings = settings_json(opt, layers, out_dt, ck);
  json index = {{"format", kFormat},
                {"settings", settings},
                {"shards", json::array()},
                {"inputs", json::object()},
                {"nonfinite", json::object()}};
  if (fs::exists(sum.index)) {
    std::ifstream f(sum.index);
    json old;
    try {
      old = json::parse(f, json_depth_limit<json>(sum.index.string()));
    } catch (const json::exception& e) {  // parse_error, or out_of_range for 1e400
      fail("{}: not valid JSON ({}); remove it to start over", sum.index.string(), e.what());
    }
    auto shards_ok = [&] {
      if (!old.contains("shards") || !old["shards"].is_array()) return false;
      for (const auto& x : old["shards"])
        if (!x.is_string() || x.get<std::string>().rfind("hidden-", 0) != 0) return false;
      return true;
    };
    if (!old.is_object() || old.value("format", "") != kFormat || !old.contains("inputs") ||
        !old["inputs"].is_object() || !old.contains("settings") || !old["settings"].is_object() ||
        !shards_ok())
      fail("{}: not a nanscope hidden index; use another --out", sum.index.string());
    std::vector<std::string> diffs;
    for (const auto& [k, v] : settings.items()) {
      const json& o = old["settings"].contains(k) ? old["settings"][k] : json();
      if (o != v) diffs.push_back(fmt::format("{} {} (this run: {})", k, o.dump(), v.dump()));
    }
    // A setting only the earlier run had (its adapter, its slice) differs too.
    for (const auto& [k, o] : old["settings"].items())
      if (!settings.contains(k))
        diffs.push_back(fmt::format("{} {} (this run: none)", k, o.dump()));
    if (!diffs.empty())
      fail("{}: written with other settings: {}; rerun with the same settings or another --out",
           sum.index.string(), fmt::join(diffs, ", "));
    index = std::move(old);
  }
  int64_t next_shard = 1;
  for (const auto& s : index["shards"]) {
    const std::string name = s.get<std::string>();
    int64_t n = 0;
    std::from_chars(name.data() + 7, name.data() + name.size(), n);  // "hidden-NNNNN..."
    next_shard = std::max(next_shard, n + 1);
  }

  std::vector<const HiddenInput*> todo;
  std::vector<int64_t> todo_positions;
  int64_t todo_tokens = 0;
  for (const auto& [pos, in] : inputs) {
    if (index["inputs"].contains(in->id)) {
      ++sum.skipped;
      continue;
    }
    todo.push_back(in);
    todo_positions.push_back(pos);
    todo_tokens += in->tokens();
  }

  // A batch's shard is written by a thread of its own while the next batch computes (on the
  // GPU a batch of full states took less time to compute than to write). One write at a time,
  // in order: the index names a shard's inputs only once it is in place, so a run stopped at
  // any point resumes from the shards it finished. `mu` guards `sum` and `index` (the callbacks
  // read them).
  std::mutex mu;
  auto write_shard = [&](std::vector<Pending> pending) {
    if (pending.empty()) return;
    const std::string name = shard_name(next_shard++);
    std::vector<TensorSpec> specs;
    for (const auto& p : pending)
      for (const auto& [l, v] : p.tensors)
        specs.push_back({fmt::format("{}.layer{}", p.id, l), out_dt, p.shape});
    SafetensorsWriter w(out / name, specs, {{"format", kFormat}, {"settings", settings.dump()}});
    for (const auto& p : pending)
      for (const auto& [l, v] : p.tensors) w.write(v);
    w.commit();
    const std::lock_guard<std::mutex> lock(mu);
    // The shard is in place; only now does the index name its inputs.
    index["shards"].push_back(name);
    for (const auto& p : pending)
      index["inputs"][p.id] = {
          {"file", name},   {"input_index", p.input_index},  {"tokens", p.tokens},
          {"kind", p.kind}, {"finite", p.nonfinite.empty()}, {"nonfinite_layers", p.nonfinite}};
    // Top-level summary of every input with NaN/inf: id -> states.
    json nf = json::object();
    for (const auto& [id, v] : index["inputs"].items())
      if (!v.value("finite", true)) nf[id] = v.value("nonfinite_layers", json::array());
    index["nonfinite"] = nf;
    write_file_atomic(sum.index, index.dump(1) + "\n");
    sum.shards.push_back(name);
    if (opt.on_shard) opt.on_shard(sum, int64_t(pending.size()));
  };
  std::future<void> writing;  // the previous batch's shard
  const auto wait_written = [&] {
    if (writing.valid()) writing.get();  // rethrows the writer's error (a full disk)
  };

  // An empty first run still leaves an index behind, so that a directory is always readable.
  if (!fs::exists(sum.index)) write_file_atomic(sum.index, index.dump(1) + "\n");

  // Many inputs read every weight many times: keep the pages mapped between batches (clean
  // file-backed pages, which the kernel can still reclaim) instead of faulting them back in.
  ForwardOptions fwd = opt.fwd;
  fwd.adapter = overlay.get();
  if (todo_tokens > opt.batch_tokens) fwd.release_pages = false;
  std::vector<int64_t> todo_lengths;
  for (const HiddenInput* in : todo) todo_lengths.push_back(in->tokens());
  for (const auto& [b0, b1] : batch_ranges(todo_lengths, opt.batch_tokens)) {
    // One batch: run through the model together, written as one shard.
    ck.check_unchanged();  // weights rewritten by another process during a long run
    const std::span<const HiddenInput* const> batch(todo.data() + b0, b1 - b0);
    std::vector<Pending> pending;
    for (size_t i = b0; i < b1; ++i) {
      const HiddenInput* in = todo[i];
      Pending p;
      p.id = in->id;
      p.input_index = todo_positions[i];
      p.tokens = in->tokens();
      p.kind = std::string(in->kind());
      p.shape =
          opt.pool == Pool::None ? std::vector<int64_t>{p.tokens, H} : std::vector<int64_t>{H};
      pending.push_back(std::move(p));
    }
    // What is written must be finite too (fp32 -> fp16 can overflow), and so must the state it
    // came from (last-token pooling would hide earlier positions). A whole state is finite
    // exactly when its conversion is (NaN and inf stay what they are).
    const auto keep = [&](size_t b, int64_t layer, std::span<const float> v, bool state_finite) {
      Pending& p = pending[b];
      const size_t eb = size_t(dtype_bits(out_dt) / 8);
      std::vector<std::byte> bytes(v.size() * eb);
      parallel_for(int64_t(v.size()), int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
        store_from_f32(v.data() + lo, out_dt, bytes.data() + size_t(lo) * eb, size_t(hi - lo));
      });
      if (!state_finite || !all_finite_stored(bytes, out_dt)) p.nonfinite.push_back(layer);
      p.tensors.emplace_back(layer, std::move(bytes));
    };
    if (opt.pool == Pool::None) {
      hidden_states_batch(
          ck, batch, fwd, layers,
          [&](size_t b, int64_t layer, std::span<const float> st) { keep(b, layer, st, true); });
    } else {
      const Pool pools[] = {opt.pool};
      hidden_states_pooled(ck, batch, fwd, layers, pools,
                           [&](size_t b, int64_t layer, Pool, std::span<const float> v,
                               bool state_finite) { keep(b, layer, v, state_finite); });
    }
    wait_written();
    {
      const std::lock_guard<std::mutex> lock(mu);
      for (const Pending& p : pending) sum.tokens += p.tokens;
      sum.written += int64_t(batch.size());
      if (opt.progress) opt.progress(sum.written, int64_t(todo.size()), sum.tokens, todo_tokens);
    }
    writing = std::async(std::launch::async, write_shard, std::move(pending));
  }
  wait_written();

  for (const auto& [id, v] : index["inputs"].items())
    if (!v.value("finite", true))
      sum.nonfinite.push_back({id, v.value("nonfinite_layers", std::vector<int64_t>{})});
  sum.seconds = std::chrono::duration<double>(clock::now() - t0).count();
  return sum;
}

json hidden_summary_json(const HiddenRunSummary& r) {
  json nf = json::array();
  for (const auto& n : r.nonfinite) nf.push_back({{"id", n.id}, {"layers", n.layers}});
  return json{
      {"out", r.out.string()}, {"index", r.index.string()},
      {"inputs", r.inputs},    {"written", r.written},
      {"skipped", r.skipped},  {"tokens", r.tokens},
      {"seconds", r.seconds},  {"tokens_per_s", r.seconds > 0 ? double(r.tokens) / r.seconds : 0.0},
      {"shards", r.shards},    {"nonfinite", nf}};
}

std::string hidden_summary_text(const HiddenRunSummary& r) {
  std::string s = fmt::format(
      "{} inputs: {} computed ({} tokens, {:.1f} tokens/s) into {} shard(s), {} already in {}\n",
      r.inputs, r.written, r.tokens, r.seconds > 0 ? double(r.tokens) / r.seconds : 0.0,
      r.shards.size(), r.skipped, r.index.string());
  if (r.nonfinite.empty()) return s + "All hidden states finite.\n";
  s += fmt::format("NaN/inf in the hidden states of {} input(s):\n", r.nonfinite.size());
  for (const auto& n : r.nonfinite)
    s += fmt::format("  {}: states {}\n", n.id, fmt::join(n.layers, ","));
  return s;
}

}  // namespace nanscope
