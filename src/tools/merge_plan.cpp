// Planning of a merge (merge_plan.hpp): the adapter's tensors by role, where each update lands,
// and the output's shards. No arithmetic happens here.
#include "tools/merge_plan.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "common/error.hpp"
#include "formats/peft_names.hpp"
#include "numerics/stats.hpp"

namespace nanscope {


MergePlan plan_merge(const MergeOptions& o, const Checkpoint& base, const Adapter& ad, DType out) {
  MergePlan mp;
  const AdapterConfig& cfg = ad.config();
  // Tied embeddings: one tensor (embed_tokens) serves as the output projection too.
  mp.base_tied =
      base.config().tie_word_embeddings && !base.find(kLmHeadWeight) && base.find(kEmbedWeight);
  mp.adapter = plan_adapter(ad, base, mp.base_tied);

  // Modules the file carries that the config would not target: peft would leave them out.
  for (const auto& [module, m] : mp.adapter.lora)
    if (!is_targeted(cfg, module))
      mp.warnings.push_back(fmt::format(
          "module {} has LoRA tensors but adapter_config.json does not target it (peft would "
          "ignore them); merged anyway",
          module));

  const bool lora_embed = mp.adapter.lora.count("model.embed_tokens") > 0;
  const bool lora_lm = mp.adapter.lora.count("lm_head") > 0;
  if (mp.base_tied && cfg.ensure_weight_tying && lora_lm) {
    mp.warnings.push_back(
        "ensure_weight_tying: the lm_head LoRA is the tied copy of the embedding's; applied once");
    mp.adapter.lora.erase("lm_head");
  }
  const bool touches_lm = lora_lm || mp.adapter.replace.count(kLmHeadWeight);
  mp.untied = mp.base_tied && !cfg.ensure_weight_tying &&
              ((o.tied == TiedMode::Untie && (lora_embed || touches_lm)) ||
               (mp.adapter.replace.count(kLmHeadWeight) && !mp.adapter.lora.count("lm_head") &&
                std::find(cfg.modules_to_save.begin(), cfg.modules_to_save.end(), "lm_head") !=
                    cfg.modules_to_save.end()));
  mp.tie_word_embeddings = base.config().tie_word_embeddings && !mp.untied;

  // The output tensors: the base's, in its shard and file order; lm_head added after the
  // embedding when untying.
  std::vector<OutTensor>& tensors = mp.tensors;
  std::vector<Shard>& shards = mp.shards;
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
        t.dtype = is_float_computable(info.dtype) ? out : info.dtype;
        t.nbytes = info.numel() * uint64_t(dtype_bits(t.dtype)) / 8;
        sh.tensors.push_back(tensors.size());
        tensors.push_back(std::move(t));
      };
      add(info.name);
      if (mp.untied && info.name == kEmbedWeight) add(kLmHeadWeight);
    }
    shards.push_back(std::move(sh));
  }
  std::map<std::string, size_t> index_of;
  for (size_t i = 0; i < tensors.size(); ++i) index_of[tensors[i].name] = i;
  // Where an update to `name` lands: tied and not untied, lm_head is the embedding.
  auto target = [&](const std::string& name) -> OutTensor& {
    std::string n =
        (name == kLmHeadWeight && mp.base_tied && !mp.untied) ? std::string(kEmbedWeight) : name;
    return tensors[index_of.at(n)];
  };
  for (const auto& [name, src] : mp.adapter.replace) {
    OutTensor& t = target(name);
    // In a tied model that stays tied, lm_head.base_layer.weight is the embedding itself.
    if (!t.replace || name != kLmHeadWeight) t.replace = src;
  }
  // peft merges in module order; embed_tokens comes before lm_head.
  for (const auto& m : {std::string("model.embed_tokens")}) {
    if (mp.adapter.lora.count(m)) target(m + ".weight").lora.push_back(&mp.adapter.lora.at(m));
  }
  for (const auto& [module, m] : mp.adapter.lora) {
    if (module == "model.embed_tokens") continue;
    target(module + ".weight").lora.push_back(&m);
    if (m.bias) target(module + ".bias").bias_of = &m;
  }
  for (const auto& [name, rows] : mp.adapter.token_rows) {
    target(name).rows = &rows;
    if (mp.untied && name == kEmbedWeight) tensors[index_of.at(kLmHeadWeight)].rows = &rows;
  }
  for (const auto& t : tensors) {
    if (t.lora.size() > 1)
      mp.warnings.push_back(fmt::format(
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

  return mp;
}

}  // namespace nanscope
