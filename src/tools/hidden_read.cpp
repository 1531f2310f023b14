#include "tools/hidden_read.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <set>
#include <sstream>
#include <string_view>

#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "common/json_depth.hpp"
#include "formats/safetensors.hpp"
#include "numerics/dtype.hpp"

namespace nanscope {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kFormat = "nanscope-hidden/1";

json read_index(const fs::path& p) {
  std::ifstream f(p);
  if (!f)
    fail(
        "{}: cannot be read: not an output directory of nanscope hidden (nor one holding "
        "slice-K-of-N directories)",
        p.string());
  std::stringstream ss;
  ss << f.rdbuf();
  json j;
  try {
    j = json::parse(ss.str(), json_depth_limit<json>(p.string()));
  } catch (const json::exception& e) {  // parse_error, or out_of_range for 1e400
    fail("{}: not valid JSON ({})", p.string(), e.what());
  }
  if (!j.is_object() || !j.contains("format") || j["format"] != kFormat ||
      !j.contains("settings") || !j["settings"].is_object() || !j.contains("inputs") ||
      !j["inputs"].is_object() || !j["settings"].contains("num_states") ||
      !j["settings"]["num_states"].is_number_integer() || !j["settings"].contains("hidden_size") ||
      !j["settings"]["hidden_size"].is_number_integer())
    fail("{}: not a nanscope hidden index", p.string());
  return j;
}

// "slice-KKKKK-of-NNNNN" (slice_dir_name's form): K, else -1. A fixed-width name needs no regex
// (std::regex also trips GCC 12's -Wmaybe-uninitialized under the sanitizers).
int64_t slice_index_of(const std::string& name) {
  const std::string_view pre = "slice-", mid = "-of-";
  if (name.size() != pre.size() + 5 + mid.size() + 5 || name.compare(0, pre.size(), pre) != 0 ||
      name.compare(pre.size() + 5, mid.size(), mid) != 0)
    return -1;
  for (size_t i : {size_t(0), pre.size() + 5 + mid.size()})
    for (size_t k = 0; k < 5; ++k)
      if (!std::isdigit(static_cast<unsigned char>(name[(i ? i : pre.size()) + k]))) return -1;
  return std::stoll(name.substr(pre.size(), 5));
}

// The slice directories directly under dir, by K.
std::vector<std::pair<int64_t, fs::path>> slice_dirs(const fs::path& dir) {
  std::vector<std::pair<int64_t, fs::path>> out;
  std::error_code ec;
  for (const auto& d : fs::directory_iterator(dir, ec)) {
    const int64_t k = slice_index_of(d.path().filename().string());
    if (d.is_directory() && k >= 0) out.emplace_back(k, d.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

json without_slice(json s) {
  s.erase("slice");
  return s;
}

}  // namespace

bool is_merged_index(const fs::path& index_json) {
  std::ifstream f(index_json);
  std::stringstream ss;
  ss << f.rdbuf();
  const json j = json::parse(ss.str(), nullptr, false);
  return j.is_object() && j.contains("slices");
}

HiddenSet HiddenSet::open(std::span<const fs::path> paths) {
  if (paths.empty()) fail("no hidden output directory given");
  HiddenSet s;
  struct Source {
    fs::path dir;  // where the index is
    json index;
  };
  std::vector<Source> sources;
  for (const fs::path& p : paths) {
    if (!fs::is_directory(p))
      fail("{}: {}", p.string(), fs::exists(p) ? "not a directory" : "does not exist");
    const auto slices = slice_dirs(p);
    if (slices.empty()) {
      sources.push_back({p, read_index(p / "index.json")});
      continue;
    }
    // Read the slices themselves (not a merged index beside them, which may be older).
    const size_t before = sources.size();
    for (const auto& [k, d] : slices) {
      if (!fs::exists(d / "index.json")) continue;  // started, nothing finished yet
      sources.push_back({d, read_index(d / "index.json")});
    }
    if (sources.size() == before)
      fail("{}: none of its slice directories holds an index.json yet", p.string());
  }

  // Settings must agree (the slice aside); slices must be of one N, each K once.
  std::set<int64_t> found;
  std::map<int64_t, fs::path> slice_of;
  bool sliced = false;
  for (size_t i = 0; i < sources.size(); ++i) {
    const json& idx = sources[i].index;
    const json st = without_slice(idx["settings"]);
    if (i == 0) {
      s.settings_ = st;
    } else if (st != s.settings_) {
      std::vector<std::string> diffs;
      for (const auto& [k, v] : st.items()) {
        const json& o = s.settings_.contains(k) ? s.settings_[k] : json();
        if (o != v)
          diffs.push_back(
              fmt::format("{} {} ({}: {})", k, o.dump(), sources[i].dir.string(), v.dump()));
      }
      fail("{} and {} were written with other settings: {}; they are not slices of one run",
           sources[0].dir.string(), sources[i].dir.string(), fmt::join(diffs, ", "));
    }
    int64_t count = 0;
    std::vector<int64_t> ks;
    if (idx.contains("slices")) {  // a merged index: the slices it names
      count = idx.value("slice_count", int64_t(1));
      const auto miss = idx.value("missing_slices", std::vector<int64_t>{});
      for (int64_t k = 0; k < count; ++k)
        if (std::find(miss.begin(), miss.end(), k) == miss.end()) ks.push_back(k);
    } else if (idx["settings"].contains("slice")) {
      const json& sl = idx["settings"]["slice"];
      count = sl.value("count", int64_t(0));
      ks.push_back(sl.value("index", int64_t(-1)));
    }
    if (count == 0) continue;
    if (sliced && count != s.slice_count_)
      fail("{}: a slice of {} (--shard K/{}), the others of {}; they are not slices of one run",
           sources[i].dir.string(), count, count, s.slice_count_);
    sliced = true;
    s.slice_count_ = count;
    for (int64_t k : ks) {
      if (k < 0 || k >= count)
        fail("{}: slice {} of {} is out of range", sources[i].dir.string(), k, count);
      if (!found.insert(k).second)
        fail("{} and {} both hold slice {}/{}", slice_of[k].string(), sources[i].dir.string(), k,
             count);
      slice_of[k] = sources[i].dir;
    }
  }
  if (sliced)
    for (int64_t k = 0; k < s.slice_count_; ++k)
      if (!found.count(k)) s.missing_.push_back(k);

  // Entries of every source, with the rank of their shard to order indexes without input_index.
  struct Keyed {
    HiddenEntry e;
    int64_t shard_rank;
  };
  std::vector<Keyed> all;
  std::map<int64_t, size_t> by_position;
  for (size_t i = 0; i < sources.size(); ++i) {
    const Source& src = sources[i];
    s.dirs_.push_back(src.dir);
    std::map<std::string, int64_t> rank;
    if (src.index.contains("shards") && src.index["shards"].is_array())
      for (const auto& x : src.index["shards"])
        if (x.is_string()) rank.emplace(x.get<std::string>(), int64_t(rank.size()));
    for (const auto& [id, v] : src.index["inputs"].items()) {
      if (!v.is_object() || !v.contains("file") || !v["file"].is_string())
        fail("{}: input {} has no shard file", (src.dir / "index.json").string(), id);
      HiddenEntry e;
      e.id = id;
      const std::string file = v["file"].get<std::string>();
      e.file = src.dir / file;
      e.input_index = v.value("input_index", int64_t(-1));
      e.tokens = v.value("tokens", int64_t(0));
      e.kind = v.value("kind", "");
      e.finite = v.value("finite", true);
      e.nonfinite_layers = v.value("nonfinite_layers", std::vector<int64_t>{});
      e.dir = i;
      if (auto it = s.by_id_.find(id); it != s.by_id_.end())
        fail("input {} is in both {} and {}: slices of one run never share an input", id,
             sources[all[it->second].e.dir].dir.string(), src.dir.string());
      if (e.input_index >= 0) {
        auto [it, fresh] = by_position.emplace(e.input_index, all.size());
        if (!fresh)
          fail(
              "{} and {} both hold input {} of the input file (ids {} and {}): slices of "
              "different input files?",
              sources[all[it->second].e.dir].dir.string(), src.dir.string(), e.input_index,
              all[it->second].e.id, id);
      }
      const auto r = rank.find(file);
      s.by_id_.emplace(id, all.size());
      all.push_back({std::move(e), r == rank.end() ? int64_t(rank.size()) : r->second});
    }
  }
  // Input order; entries of indexes without input_index come after, shard by shard.
  std::stable_sort(all.begin(), all.end(), [](const Keyed& a, const Keyed& b) {
    const bool la = a.e.input_index < 0, lb = b.e.input_index < 0;
    if (la != lb) return lb;
    if (!la) return a.e.input_index < b.e.input_index;
    return std::tie(a.e.dir, a.shard_rank, a.e.id) < std::tie(b.e.dir, b.shard_rank, b.e.id);
  });
  s.by_id_.clear();
  for (auto& k : all) {
    s.by_id_.emplace(k.e.id, s.entries_.size());
    s.entries_.push_back(std::move(k.e));
  }
  return s;
}

std::vector<int64_t> HiddenSet::layers() const {
  return settings_.value("layers", std::vector<int64_t>{});
}

const HiddenEntry* HiddenSet::find(std::string_view id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &entries_[it->second];
}

std::vector<int64_t> HiddenSet::shape(const HiddenEntry& e) const {
  const int64_t H = settings_["hidden_size"].get<int64_t>();
  if (settings_.value("pool", "none") == "none") return {e.tokens, H};
  return {H};
}

std::vector<float> HiddenSet::read(const HiddenEntry& e, int64_t layer) const {
  const int64_t S = settings_["num_states"].get<int64_t>();
  const int64_t k = layer < 0 ? layer + S : layer;
  const std::vector<int64_t> kept = layers();
  if (std::find(kept.begin(), kept.end(), k) == kept.end())
    fail("state {} was not kept: {} holds states {} of 0..{}", layer, dirs_[e.dir].string(),
         fmt::join(kept, ", "), S - 1);
  std::shared_ptr<SafetensorsFile> f;
  {
    std::lock_guard<std::mutex> lock(*mu_);
    // A run has thousands of shards: hold few open (each keeps a descriptor and a mapping).
    // What read() returns is a copy, so dropping them is safe.
    if (files_.size() >= 64 && !files_.count(e.file)) files_.clear();
    auto& slot = files_[e.file];
    if (!slot) slot = SafetensorsFile::open(e.file);
    f = slot;
  }
  const std::string name = fmt::format("{}.layer{}", e.id, k);
  const TensorInfo* t = f->find(name);
  const std::vector<int64_t> want = shape(e);
  if (!t)
    fail("{}: has no tensor {}, which its index names: the shard was replaced?", e.file.string(),
         name);
  if (t->shape != want)
    fail("{}: {} has shape [{}], the index says [{}]", e.file.string(), name,
         fmt::join(t->shape, ", "), fmt::join(want, ", "));
  if (t->dtype != DType::F32 && t->dtype != DType::BF16 && t->dtype != DType::F16)
    fail("{}: {} is {}, expected F32, BF16 or F16", e.file.string(), name, dtype_name(t->dtype));
  std::vector<float> out(size_t(t->numel()));
  load_to_f32(f->data(*t).data(), t->dtype, out.data(), out.size());
  return out;
}

json write_merged_index(const HiddenSet& set, const fs::path& out) {
  const fs::path index_path = out / "index.json";
  if (fs::exists(index_path) && !is_merged_index(index_path))
    fail("{}: is the index of a run, not a merged one; give --out another directory",
         index_path.string());
  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec) throw OutputError(fmt::format("{}: {}", out.string(), ec.message()));
  const fs::path base = fs::absolute(out).lexically_normal();
  auto rel = [&](const fs::path& p) {
    return fs::absolute(p).lexically_normal().lexically_relative(base).generic_string();
  };
  json inputs = json::object(), order = json::array(), shards = json::array(),
       nonfinite = json::object(), slices = json::array();
  std::set<std::string> seen;
  for (const HiddenEntry& e : set.entries()) {
    const std::string file = rel(e.file);
    if (seen.insert(file).second) shards.push_back(file);
    json v = {{"file", file},
              {"tokens", e.tokens},
              {"kind", e.kind},
              {"finite", e.finite},
              {"nonfinite_layers", e.nonfinite_layers}};
    if (e.input_index >= 0) v["input_index"] = e.input_index;
    inputs[e.id] = std::move(v);
    order.push_back(e.id);
    if (!e.finite) nonfinite[e.id] = e.nonfinite_layers;
  }
  for (const fs::path& d : set.dirs()) slices.push_back(rel(d));
  json doc = {{"format", kFormat},
              {"settings", set.settings()},
              {"slices", slices},
              {"slice_count", set.slice_count()},
              {"missing_slices", set.missing_slices()},
              {"shards", shards},
              {"order", order},
              {"inputs", inputs},
              {"nonfinite", nonfinite}};
  write_file_atomic(index_path, doc.dump(1) + "\n");
  return doc;
}

}  // namespace nanscope
