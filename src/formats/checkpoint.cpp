#include "formats/checkpoint.hpp"

#include <set>
#include <unordered_map>

#include "common/error.hpp"
#include "formats/hub.hpp"

namespace nanscope {

namespace fs = std::filesystem;

Checkpoint Checkpoint::open(const fs::path& dir) {
  Checkpoint ck;
  ck.dir_ = dir;
  std::error_code ec;
  if (!fs::exists(dir, ec)) fail_not_found(dir, "{}: no such file or directory", dir.string());
  if (!fs::is_directory(dir, ec))
    fail(
        "{}: is a file, not a directory (expected a Hugging Face checkpoint directory: "
        "config.json and model.safetensors)",
        dir.string());
  const fs::path config = dir / "config.json";
  if (!fs::exists(config, ec)) {
    if (fs::exists(dir / "adapter_config.json", ec))
      fail(
          "{}: this is a PEFT adapter (adapter_config.json), not a model: pass it as --adapter "
          "{}, with the model it was trained on as --base (merge) or beside the merged MODEL "
          "(check)",
          dir.string(), dir.string());
    fail("{}: config.json is missing{}", dir.string(), dangling_link_note(config));
  }
  ck.config_ = load_model_config(config);

  const fs::path index = dir / "model.safetensors.index.json";
  const fs::path single = dir / "model.safetensors";
  if (fs::exists(index, ec)) {
    ck.sharded_ = true;
    nlohmann::json j = read_json_file(index);
    auto wm = j.find("weight_map");
    if (!j.is_object() || wm == j.end() || !wm->is_object())
      fail("{}: `weight_map` is missing or not an object", index.string());
    // Open each shard once, in the order the index first names them.
    std::unordered_map<std::string, size_t> shard_of_file;
    std::vector<std::pair<std::string, std::string>> entries;
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string())
        fail("{}: weight_map entry for {} is not a file name", index.string(), it.key());
      const std::string file = it.value().get<std::string>();
      if (file.find('/') != std::string::npos || file == ".." || file.empty())
        fail("{}: weight_map names {} for {}, which is not a file in this directory",
             index.string(), file, it.key());
      if (!shard_of_file.count(file)) {
        const fs::path sp = dir / file;
        if (!fs::exists(sp, ec))
          fail("{}: shard {} (named for tensor {}) is missing{}", index.string(), file, it.key(),
               dangling_link_note(sp));
        shard_of_file[file] = ck.files_.size();
        ck.files_.push_back(SafetensorsFile::open(sp));
      }
      entries.emplace_back(it.key(), file);
    }
    for (const auto& [name, file] : entries) {
      const SafetensorsFile* f = ck.files_[shard_of_file[file]].get();
      const TensorInfo* info = f->find(name);
      if (!info)
        fail("{}: the index puts tensor {} in {}, but that shard does not hold it", index.string(),
             name, file);
      ck.tensors_[name] = TensorRef{f, info};
    }
    // Tensors a shard holds that the index forgot would be invisible to transformers too; they
    // are not loaded, so they do not count as part of the model.
  } else if (fs::exists(single, ec)) {
    ck.files_.push_back(SafetensorsFile::open(single));
    for (const auto& t : ck.files_[0]->tensors())
      ck.tensors_[t.name] = TensorRef{ck.files_[0].get(), &t};
  } else {
    bool has_bin = fs::exists(dir / "pytorch_model.bin", ec) ||
                   fs::exists(dir / "pytorch_model.bin.index.json", ec);
    fail("{}: no model.safetensors or model.safetensors.index.json{}", dir.string(),
         has_bin ? " (only pytorch_model.bin: re-save it with save_pretrained(..., "
                   "safe_serialization=True))"
                 : "");
  }
  return ck;
}

std::optional<TensorRef> Checkpoint::find(std::string_view name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) return std::nullopt;
  return it->second;
}

TensorRef Checkpoint::get(std::string_view name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) fail("{}: tensor {} is missing", dir_.string(), name);
  return it->second;
}

uint64_t Checkpoint::total_bytes() const {
  uint64_t n = 0;
  for (const auto& [name, ref] : tensors_) n += ref.info->nbytes();
  return n;
}

DType Checkpoint::storage_dtype() const {
  std::map<DType, uint64_t> bytes;
  for (const auto& [name, ref] : tensors_)
    if (is_float_computable(ref.info->dtype)) bytes[ref.info->dtype] += ref.info->nbytes();
  DType best = config_.dtype.value_or(DType::F32);
  uint64_t most = 0;
  for (const auto& [t, n] : bytes)
    if (n > most) best = t, most = n;
  return best;
}

}  // namespace nanscope
