#include "tools/scan.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <set>
#include <thread>

#include "common/interrupt_check.hpp"
#include "formats/adapter.hpp"
#include "formats/peft_names.hpp"
#include "model/arch.hpp"

namespace nanscope {

const char* severity_name(Severity s) {
  return s == Severity::Error ? "error" : "warning";
}

const char* finding_kind_name(FindingKind k) {
  switch (k) {
    case FindingKind::Nonfinite:
      return "nonfinite";
    case FindingKind::Fp16Range:
      return "fp16_range";
    case FindingKind::MissingTensor:
      return "missing_tensor";
    case FindingKind::UnexpectedTensor:
      return "unexpected_tensor";
    case FindingKind::ShapeMismatch:
      return "shape_mismatch";
    case FindingKind::AdapterKeys:
      return "adapter_keys";
    case FindingKind::TiedEmbeddings:
      return "tied_embeddings";
  }
  return "?";
}

bool ScanResult::has_error() const {
  return std::any_of(findings.begin(), findings.end(),
                     [](const Finding& f) { return f.severity == Severity::Error; });
}

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  return fmt::format("[{}]", fmt::join(s, ", "));
}

}  // namespace

std::vector<Finding> check_structure(const Checkpoint& ck) {
  const ModelConfig& c = ck.config();
  std::vector<Finding> out;
  const auto expected = expected_tensors(c);
  std::set<std::string, std::less<>> expected_names;
  for (const auto& e : expected) expected_names.insert(e.name);

  // Leftover PEFT-wrapped keys, keyed by the model tensor they stand for
  // ("base_model.model.model.x.base_layer.weight" -> "model.x.weight"), so that a missing tensor
  // can be blamed on the wrapping.
  std::map<std::string, std::vector<std::string>> peft_for;
  for (const auto& [name, ref] : ck.tensors()) {
    const std::optional<PeftName> p = parse_peft_name(name);
    if (p && !p->is_lora() && (p->prefixed || p->wrapped)) peft_for[p->target].push_back(name);
  }

  for (const auto& e : expected) {
    auto ref = ck.find(e.name);
    if (!ref) {
      if (!e.required) continue;
      if (e.name == "lm_head.weight") {
        out.push_back({Severity::Error, FindingKind::TiedEmbeddings, e.name, 0,
                       "config.json says tie_word_embeddings=false but there is no "
                       "lm_head.weight: transformers would initialise the output layer at random"});
        continue;
      }
      auto it = peft_for.find(e.name);
      if (it != peft_for.end()) continue;  // reported below as adapter_keys
      out.push_back({Severity::Error, FindingKind::MissingTensor, e.name, 0,
                     fmt::format("expected {} ({}); transformers would initialise it at random "
                                 "and only warn",
                                 shape_str(e.shape), c.model_type)});
      continue;
    }
    if (ref->info->shape != e.shape)
      out.push_back({Severity::Error, FindingKind::ShapeMismatch, e.name, 0,
                     fmt::format("expected {} from config.json, found {}", shape_str(e.shape),
                                 shape_str(ref->info->shape))});
  }
  const ModelSpec spec = model_spec(c);
  for (const auto& [name, ref] : ck.tensors()) {
    if (expected_names.count(name)) continue;
    if (std::any_of(spec.foreign_prefixes.begin(), spec.foreign_prefixes.end(),
                    [&](const std::string& p) { return name.starts_with(p); }))
      continue;  // a multimodal checkpoint's vision tower: not part of the text model

    if (is_peft_key(name)) {
      const std::optional<PeftName> p = parse_peft_name(name);
      out.push_back({Severity::Error, FindingKind::AdapterKeys, name, 0,
                     !p || (p->is_lora() && p->role != PeftRole::TokenRows)
                         ? "unmerged LoRA tensor left in the model: merge_and_unload() was not "
                           "called, or the PeftModel's state dict was saved"
                         : fmt::format("PEFT-wrapped name of {}: transformers will not find it "
                                       "and initialises that weight at random",
                                       p->target)});
      continue;
    }
    if (name == "lm_head.weight" && c.tie_word_embeddings) {
      auto emb = ck.find("model.embed_tokens.weight");
      const bool same =
          emb && emb->info->shape == ref.info->shape && emb->info->dtype == ref.info->dtype &&
          std::memcmp(emb->bytes().data(), ref.bytes().data(), ref.bytes().size()) == 0;
      if (same)
        out.push_back({Severity::Warning, FindingKind::TiedEmbeddings, name, 0,
                       "config.json ties the embeddings and lm_head.weight is a redundant "
                       "identical copy"});
      else
        out.push_back({Severity::Error, FindingKind::TiedEmbeddings, name, 0,
                       "config.json says tie_word_embeddings=true but lm_head.weight differs from "
                       "model.embed_tokens.weight: transformers ties them and silently drops "
                       "lm_head.weight (a merge that changed lm_head is lost); set "
                       "tie_word_embeddings=false"});
      continue;
    }
    out.push_back({Severity::Warning, FindingKind::UnexpectedTensor, name, 0,
                   fmt::format("not part of a {} model with this config; transformers ignores "
                               "it with a warning",
                               c.model_type)});
  }
  return out;
}

std::vector<TensorReport> scan_values(
    const std::vector<std::pair<const SafetensorsFile*, const TensorInfo*>>& tensors,
    const std::string& source, int threads) {
  std::vector<TensorReport> reports(tensors.size());
  struct Chunk {
    size_t tensor;
    uint64_t first, count;  // elements
  };
  // Chunks small enough to balance the threads when one tensor (the embedding) dominates.
  constexpr uint64_t kChunkBytes = 32ull << 20;
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorInfo& t = *tensors[i].second;
    reports[i].name = t.name;
    reports[i].source = source;
    reports[i].dtype = t.dtype;
    reports[i].shape = t.shape;
    reports[i].computed = is_float_computable(t.dtype);
    if (!reports[i].computed) continue;
    const uint64_t n = t.numel(), esz = uint64_t(dtype_bits(t.dtype) / 8);
    const uint64_t per = std::max<uint64_t>(1, kChunkBytes / esz);
    for (uint64_t f = 0; f < n; f += per) chunks.push_back({i, f, std::min(per, n - f)});
  }
  // A file that another process is writing: an InputError before and after the reads, not a
  // report on half-old, half-new bytes (one that shrinks during them is the SIGBUS handler's).
  auto check_files = [&] {
    for (const auto& [file, info] : tensors) file->check_unchanged();
  };
  check_files();
  std::vector<ValueStats> partial(chunks.size());
  std::atomic<size_t> next{0};
  std::atomic<bool> stop{false};
  std::exception_ptr interrupted;  // from the caller's safe point between its chunks
  auto worker = [&](bool caller) {
    for (size_t k; !stop.load() && (k = next.fetch_add(1)) < chunks.size();) {
      if (caller) {
        try {
          check_interrupt();
        } catch (...) {
          interrupted = std::current_exception();
          stop = true;
          break;
        }
      }
      const Chunk& ch = chunks[k];
      const auto& [file, info] = tensors[ch.tensor];
      const size_t esz = size_t(dtype_bits(info->dtype) / 8);
      const std::byte* p = file->data(*info).data() + ch.first * esz;
      partial[k] = value_stats(p, ch.count, info->dtype);
      file->release(std::span<const std::byte>(p, ch.count * esz));
    }
  };
  int n = threads > 0 ? threads : int(std::max(1u, std::thread::hardware_concurrency()));
  n = int(std::min<size_t>(size_t(n), std::max<size_t>(1, chunks.size())));
  std::vector<std::thread> pool;
  for (int i = 1; i < n; ++i) pool.emplace_back(worker, false);
  worker(true);
  for (auto& t : pool) t.join();
  if (interrupted) std::rethrow_exception(interrupted);
  check_files();
  for (size_t k = 0; k < chunks.size(); ++k) reports[chunks[k].tensor].stats.merge(partial[k]);
  return reports;
}

namespace {
void value_findings(const std::vector<TensorReport>& reports, std::vector<Finding>& out) {
  for (const auto& r : reports) {
    if (!r.computed) continue;
    const auto& s = r.stats;
    if (s.nonfinite())
      out.push_back({Severity::Error, FindingKind::Nonfinite, r.name, s.nonfinite(),
                     fmt::format("{} NaN and {} inf among {} values ({})", s.nan, s.inf, s.count,
                                 dtype_name(r.dtype)),
                     r.source});
    if (s.fp16_range)
      out.push_back({Severity::Warning, FindingKind::Fp16Range, r.name, s.fp16_range,
                     fmt::format("{} finite values beyond 65504 (abs max {:.6g}): they become inf "
                                 "if this tensor is loaded in fp16",
                                 s.fp16_range, s.abs_max),
                     r.source});
  }
}
}  // namespace

ScanResult scan(const std::filesystem::path& model_dir, const ScanOptions& opt) {
  ScanResult r;
  r.model = model_dir;
  Checkpoint ck = Checkpoint::open(model_dir);
  r.model_type = ck.config().model_type;
  find_architecture(r.model_type, ck.config().source);  // unknown: InputError before any work
  std::optional<Adapter> adapter;
  if (opt.adapter) adapter = Adapter::open(*opt.adapter);

  r.findings = check_structure(ck);
  std::vector<std::pair<const SafetensorsFile*, const TensorInfo*>> list;
  for (const auto& [name, ref] : ck.tensors()) list.emplace_back(ref.file, ref.info);
  r.tensor_reports = scan_values(list, "model", opt.threads);
  r.tensors = list.size();
  r.bytes = ck.total_bytes();
  if (adapter) {
    std::vector<std::pair<const SafetensorsFile*, const TensorInfo*>> alist;
    for (const auto& t : adapter->file().tensors()) alist.emplace_back(&adapter->file(), &t);
    auto areports = scan_values(alist, "adapter", opt.threads);
    r.tensors += alist.size();
    for (const auto& t : adapter->file().tensors()) r.bytes += t.nbytes();
    r.tensor_reports.insert(r.tensor_reports.end(), areports.begin(), areports.end());
  }
  value_findings(r.tensor_reports, r.findings);
  // Errors first, then by tensor name, so the worst news leads.
  std::stable_sort(r.findings.begin(), r.findings.end(), [](const Finding& a, const Finding& b) {
    return (a.severity == Severity::Error) > (b.severity == Severity::Error);
  });
  return r;
}

nlohmann::json scan_to_json(const ScanResult& r) {
  nlohmann::json j;
  j["model"] = r.model.string();
  j["model_type"] = r.model_type;
  j["tensors"] = r.tensors;
  j["bytes"] = r.bytes;
  j["findings"] = nlohmann::json::array();
  for (const auto& f : r.findings)
    j["findings"].push_back({{"severity", severity_name(f.severity)},
                             {"kind", finding_kind_name(f.kind)},
                             {"tensor", f.tensor},
                             {"count", f.count},
                             {"detail", f.detail},
                             {"source", f.source}});
  j["tensor_stats"] = nlohmann::json::array();
  for (const auto& t : r.tensor_reports) {
    nlohmann::json e = {
        {"name", t.name}, {"source", t.source}, {"dtype", dtype_name(t.dtype)}, {"shape", t.shape}};
    if (t.computed) {
      e["nan"] = t.stats.nan;
      e["inf"] = t.stats.inf;
      e["fp16_range"] = t.stats.fp16_range;
      e["abs_max"] = t.stats.abs_max;
    }
    j["tensor_stats"].push_back(std::move(e));
  }
  j["ok"] = !r.has_error();
  return j;
}

std::string scan_to_text(const ScanResult& r) {
  std::string s;
  size_t errors = 0, warnings = 0;
  for (const auto& f : r.findings) (f.severity == Severity::Error ? errors : warnings)++;
  s += fmt::format("{}: {} model, {} tensors, {:.1f} MiB\n", r.model.string(), r.model_type,
                   r.tensors, double(r.bytes) / (1 << 20));
  // Group findings of one kind so a model with hundreds of leftover keys stays readable.
  std::map<std::string, std::vector<const Finding*>> by_kind;
  std::vector<std::string> order;
  for (const auto& f : r.findings) {
    auto key = std::string(severity_name(f.severity)) + " " + finding_kind_name(f.kind);
    if (!by_kind.count(key)) order.push_back(key);
    by_kind[key].push_back(&f);
  }
  for (const auto& key : order) {
    const auto& v = by_kind[key];
    s += fmt::format("{} ({}):\n", key, v.size());
    for (size_t i = 0; i < v.size() && i < 12; ++i) {
      const Finding& f = *v[i];
      s += fmt::format("  {}{}: {}\n", f.source == "adapter" ? "[adapter] " : "", f.tensor,
                       f.detail);
    }
    if (v.size() > 12) s += fmt::format("  ... and {} more\n", v.size() - 12);
  }
  if (errors == 0)
    s += fmt::format("OK: structure matches config.json and every value is finite{}\n",
                     warnings ? fmt::format(" ({} warnings)", warnings) : "");
  else
    s += fmt::format("FAIL: {} errors, {} warnings\n", errors, warnings);
  return s;
}

}  // namespace nanscope
