// A Hugging Face checkpoint directory: config.json plus one safetensors file or shards with
// model.safetensors.index.json. Tensors are looked up by name across shards, zero-copy.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "formats/hf_config.hpp"
#include "formats/safetensors.hpp"

namespace nanscope {

struct TensorRef {
  const SafetensorsFile* file = nullptr;
  const TensorInfo* info = nullptr;
  std::span<const std::byte> bytes() const { return file->data(*info); }
  void release() const { file->release(*info); }
};

class Checkpoint {
 public:
  // Opens DIR; validates config.json, the index (a shard missing, or a tensor named by the index
  // that its shard does not hold, is an InputError naming both) and every shard's header.
  static Checkpoint open(const std::filesystem::path& dir);

  const std::filesystem::path& dir() const { return dir_; }
  const ModelConfig& config() const { return config_; }
  bool sharded() const { return sharded_; }
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }
  // SafetensorsFile::check_unchanged for every file: an InputError when one changed size.
  void check_unchanged() const {
    for (const auto& f : files_) f->check_unchanged();
  }
  // Every tensor, in name order.
  const std::map<std::string, TensorRef, std::less<>>& tensors() const { return tensors_; }
  std::optional<TensorRef> find(std::string_view name) const;
  // Throws InputError "DIR: tensor NAME is missing" (the forward pass needs it).
  TensorRef get(std::string_view name) const;
  uint64_t total_bytes() const;  // sum of tensor data bytes
  // The dtype most tensors are stored in (the checkpoint's dtype, for `auto`).
  DType storage_dtype() const;

 private:
  std::filesystem::path dir_;
  ModelConfig config_;
  bool sharded_ = false;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, TensorRef, std::less<>> tensors_;
};

}  // namespace nanscope
