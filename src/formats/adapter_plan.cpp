// Sorting of an adapter's tensors by role, checked against the base (adapter_plan.hpp).
#include "formats/adapter_plan.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "common/error.hpp"
#include "formats/peft_names.hpp"
#include "numerics/stats.hpp"

namespace nanscope {

namespace {

bool ends_with(std::string_view s, std::string_view suf) {
  return s.size() >= suf.size() && s.substr(s.size() - suf.size()) == suf;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

}  // namespace

AdapterPlan plan_adapter(const Adapter& ad, const Checkpoint& base, bool base_tied) {
  AdapterPlan p;
  const AdapterConfig& cfg = ad.config();
  const std::string file = (ad.dir() / "adapter_model.safetensors").string();
  auto base_has = [&](const std::string& name) {
    return base.find(name).has_value() || (base_tied && name == kLmHeadWeight);
  };
  auto base_shape = [&](const std::string& name) {
    auto r = base.find(name == kLmHeadWeight && base_tied ? std::string(kEmbedWeight) : name);
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
    const uint64_t bad = value_stats(ad.file().data(t).data(), t.numel(), t.dtype).nonfinite();
    if (bad) p.adapter_nonfinite[key] = bad;
    const std::optional<PeftName> name = parse_peft_name(key);
    if (!name || !name->adapter.empty())
      fail(
          "{}: adapter tensor {} is a LoRA tensor of an unknown form (an adapter name left in "
          "the key, like lora_A.default.weight? peft's save_pretrained removes it)",
          file, key);
    const std::string& module = name->module;
    if (name->role == PeftRole::TokenRows) {
      const std::string& target = name->target;
      if (!base_has(target))
        fail(
            "{}: adapter tensor {} replaces rows of {}, which the base checkpoint {} does not "
            "have",
            file, key, target, base.dir().string());
      // trainable_token_indices: a list targets the input embedding; a dict names modules.
      const std::vector<int64_t>* idx = nullptr;
      for (const auto& [mod, rows] : cfg.trainable_token_indices) {
        if ((mod.empty() && target == kEmbedWeight) ||
            (!mod.empty() && (module == mod || ends_with(module, "." + mod))))
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
      continue;
    }
    if (name->is_lora()) {
      LoraModule& m = p.lora[module];
      m.module = module;
      const TensorInfo** slot = nullptr;
      switch (name->role) {
        case PeftRole::LoraA:
        case PeftRole::EmbeddingA:
          slot = &m.A;
          break;
        case PeftRole::LoraB:
        case PeftRole::EmbeddingB:
          slot = &m.B;
          break;
        case PeftRole::LoraBias:
          slot = &m.bias;
          break;
        case PeftRole::Magnitude:
          slot = &m.magnitude;
          break;
        case PeftRole::TokenRows:
        case PeftRole::Saved:
          break;  // handled above and below
      }
      if (name->is_embedding()) m.embedding = true;
      if (*slot) fail("{}: module {} has two tensors for the same role ({})", file, module, key);
      *slot = &t;
      continue;
    }
    // A full tensor: modules_to_save, bias "all"/"lora_only", or an embedding's base layer
    // (peft saves `X.base_layer.weight` when it targets an embedding) -- loaded over the base.
    const std::string& target = name->target;
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

}  // namespace nanscope
