// `nanscope scan`: is the checkpoint structurally what its config says, and is every tensor
// finite? Reads each byte once, threads across tensor chunks, keeps memory flat.
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "formats/checkpoint.hpp"
#include "numerics/stats.hpp"

namespace nanscope {

enum class Severity : uint8_t { Error, Warning };
enum class FindingKind : uint8_t {
  Nonfinite,         // NaN / inf among a tensor's values
  Fp16Range,         // finite values beyond fp16's range (inf once cast to fp16)
  MissingTensor,     // config.json asks for it, no shard has it
  UnexpectedTensor,  // in a shard, not in the layer description
  ShapeMismatch,     // the shape config.json implies differs
  AdapterKeys,       // PEFT-wrapped names (base_model.model..., lora_A) in a model
  TiedEmbeddings,    // tie_word_embeddings disagrees with the tensors
};
// The JSON spellings (docs/interface.md): "error" | "warning"; "nonfinite", "fp16_range",
// "missing_tensor", "unexpected_tensor", "shape_mismatch", "adapter_keys", "tied_embeddings".
const char* severity_name(Severity s);
const char* finding_kind_name(FindingKind k);

struct Finding {
  Severity severity = Severity::Error;
  FindingKind kind = FindingKind::Nonfinite;
  std::string tensor;
  uint64_t count = 0;
  std::string detail;
  std::string source = "model";  // "model" or "adapter"
};

struct TensorReport {
  std::string name;
  std::string source;  // "model" | "adapter"
  DType dtype;
  std::vector<int64_t> shape;
  ValueStats stats;
  bool computed = false;  // false for dtypes nanscope reads but does not compute (ints, fp8)
};

struct ScanResult {
  std::filesystem::path model;
  std::string model_type;
  uint64_t tensors = 0;
  uint64_t bytes = 0;
  std::vector<Finding> findings;
  std::vector<TensorReport> tensor_reports;  // name order, model first then adapter
  bool has_error() const;
};

struct ScanOptions {
  std::optional<std::filesystem::path> adapter;
  int threads = 0;  // 0 = all cores
};

// Structure only (no tensor data read): missing / unexpected / misshapen / prefixed tensors and
// the tied-embedding check. Shared with `check` and `merge`.
std::vector<Finding> check_structure(const Checkpoint& ck);

// Values of a list of tensors, threaded; pages are released as they are done.
std::vector<TensorReport> scan_values(
    const std::vector<std::pair<const SafetensorsFile*, const TensorInfo*>>& tensors,
    const std::string& source, int threads);

ScanResult scan(const std::filesystem::path& model_dir, const ScanOptions& opt);

nlohmann::json scan_to_json(const ScanResult& r);
std::string scan_to_text(const ScanResult& r);

}  // namespace nanscope
