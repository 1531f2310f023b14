// The PEFT key grammar (formats/peft_names.hpp) that merge, scan and check share: every role, the
// names peft 0.21's save_pretrained really wrote (the fixture adapters), in-memory names with an
// adapter name, and the names it must refuse.
#include <gtest/gtest.h>

#include <filesystem>

#include "formats/peft_names.hpp"
#include "formats/safetensors.hpp"

using namespace nanscope;
namespace fs = std::filesystem;

namespace {

struct Case {
  const char* key;
  PeftRole role;
  const char* module;
  const char* target;
};

void expect_parses(const Case& c) {
  SCOPED_TRACE(c.key);
  const std::optional<PeftName> n = parse_peft_name(c.key);
  ASSERT_TRUE(n.has_value());
  EXPECT_EQ(n->role, c.role) << peft_role_name(n->role);
  EXPECT_EQ(n->module, c.module);
  EXPECT_EQ(n->target, c.target);
  EXPECT_TRUE(n->adapter.empty()) << n->adapter;
}

}  // namespace

// The names of the fixture adapters (tests/fixtures/adapters/*), one per role.
TEST(PeftNames, EveryRoleAsPeftSavesIt) {
  const std::string q = "base_model.model.model.layers.0.self_attn.q_proj";
  const std::string e = "base_model.model.model.embed_tokens";
  const Case cases[] = {
      {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", PeftRole::LoraA,
       "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj.weight"},
      {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", PeftRole::LoraB,
       "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj.weight"},
      {"base_model.model.model.layers.0.self_attn.k_proj.lora_B.bias", PeftRole::LoraBias,
       "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.k_proj.bias"},
      {"base_model.model.model.embed_tokens.lora_embedding_A", PeftRole::EmbeddingA,
       "model.embed_tokens", "model.embed_tokens.weight"},
      {"base_model.model.model.embed_tokens.lora_embedding_B", PeftRole::EmbeddingB,
       "model.embed_tokens", "model.embed_tokens.weight"},
      {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
       PeftRole::Magnitude, "model.layers.0.self_attn.q_proj",
       "model.layers.0.self_attn.q_proj.weight"},
      {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
       PeftRole::TokenRows, "model.embed_tokens", "model.embed_tokens.weight"},
      {"base_model.model.lm_head.lora_A.weight", PeftRole::LoraA, "lm_head", "lm_head.weight"},
  };
  for (const Case& c : cases) expect_parses(c);
  const std::optional<PeftName> a = parse_peft_name(e + ".lora_embedding_A");
  ASSERT_TRUE(a);
  EXPECT_TRUE(a->is_lora());
  EXPECT_TRUE(a->is_embedding());
  EXPECT_TRUE(a->prefixed);
  EXPECT_FALSE(parse_peft_name(q + ".lora_A.weight")->is_embedding());
}

// Whole tensors: modules_to_save, biases of bias="all"/"lora_only", embedding base layers.
TEST(PeftNames, SavedTensorsNameTheBaseTensorTheyReplace) {
  const Case cases[] = {
      // modules_to_save=["lm_head"] (fixture modules-to-save): saved under the plain name.
      {"base_model.model.lm_head.weight", PeftRole::Saved, "lm_head", "lm_head.weight"},
      // An older peft kept the wrapper's infix, without the adapter name.
      {"base_model.model.lm_head.modules_to_save.weight", PeftRole::Saved, "lm_head",
       "lm_head.weight"},
      // An embedding target: its base layer is saved (fixture embed-lmhead-untied).
      {"base_model.model.model.embed_tokens.base_layer.weight", PeftRole::Saved,
       "model.embed_tokens", "model.embed_tokens.weight"},
      {"base_model.model.lm_head.base_layer.weight", PeftRole::Saved, "lm_head", "lm_head.weight"},
      // bias="all" (fixture bias-all): a targeted layer's bias, and an untargeted one's.
      {"base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias", PeftRole::Saved,
       "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj.bias"},
      {"base_model.model.model.layers.0.self_attn.k_proj.bias", PeftRole::Saved,
       "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.k_proj.bias"},
      {"base_model.model.model.norm.original_module.weight", PeftRole::Saved, "model.norm",
       "model.norm.weight"},
  };
  for (const Case& c : cases) expect_parses(c);
  EXPECT_TRUE(parse_peft_name("base_model.model.lm_head.modules_to_save.weight")->wrapped);
  EXPECT_FALSE(parse_peft_name("base_model.model.lm_head.weight")->wrapped);
  EXPECT_FALSE(parse_peft_name("base_model.model.lm_head.weight")->is_lora());
}

TEST(PeftNames, WithAndWithoutThePrefix) {
  for (const char* key : {"base_model.model.model.layers.3.mlp.down_proj.lora_B.weight",
                          "model.layers.3.mlp.down_proj.lora_B.weight"}) {
    SCOPED_TRACE(key);
    const std::optional<PeftName> n = parse_peft_name(key);
    ASSERT_TRUE(n);
    EXPECT_EQ(n->role, PeftRole::LoraB);
    EXPECT_EQ(n->module, "model.layers.3.mlp.down_proj");
    EXPECT_EQ(n->target, "model.layers.3.mlp.down_proj.weight");
    EXPECT_EQ(n->prefixed, std::string_view(key).starts_with("base_model.model."));
  }
  // Only the leading prefix is removed; a module of that name deeper down is kept.
  const std::optional<PeftName> n = parse_peft_name("base_model.model.base_model.model.x.weight");
  ASSERT_TRUE(n);
  EXPECT_EQ(n->target, "base_model.model.x.weight");
}

// An in-memory state dict (or a model saved without merge_and_unload) keeps the adapter name.
TEST(PeftNames, AnAdapterNameLeftInTheKeyIsReported) {
  struct {
    const char* key;
    PeftRole role;
    const char* target;
  } cases[] = {
      {"model.layers.0.self_attn.q_proj.lora_A.default.weight", PeftRole::LoraA,
       "model.layers.0.self_attn.q_proj.weight"},
      {"model.layers.0.self_attn.q_proj.lora_B.default.bias", PeftRole::LoraBias,
       "model.layers.0.self_attn.q_proj.bias"},
      {"model.embed_tokens.lora_embedding_B.default", PeftRole::EmbeddingB,
       "model.embed_tokens.weight"},
      {"model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight", PeftRole::Magnitude,
       "model.layers.0.self_attn.q_proj.weight"},
      {"model.embed_tokens.token_adapter.trainable_tokens_delta.default", PeftRole::TokenRows,
       "model.embed_tokens.weight"},
      {"base_model.model.lm_head.modules_to_save.default.weight", PeftRole::Saved,
       "lm_head.weight"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.key);
    const std::optional<PeftName> n = parse_peft_name(c.key);
    ASSERT_TRUE(n);
    EXPECT_EQ(n->role, c.role);
    EXPECT_EQ(n->target, c.target);
    EXPECT_EQ(n->adapter, "default");
  }
}

TEST(PeftNames, RejectsLoraTensorsOfNoKnownForm) {
  for (const char* key : {
           "base_model.model.model.layers.0.self_attn.q_proj.lora_dropout.weight",  // no role
           "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight",
           "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight.extra",
           "base_model.model.model.layers.0.self_attn.q_proj.lora_A",  // no .weight
           "base_model.model.model.layers.0.self_attn.q_proj.lora_B.scale",
           "base_model.model.model.embed_tokens.lora_embedding_A.default.weight",
           "base_model.model.lora_A.weight",  // no module in front of the role
       }) {
    EXPECT_FALSE(parse_peft_name(key).has_value()) << key;
    EXPECT_TRUE(is_peft_key(key)) << key;
  }
}

// scan: which names in a MODEL checkpoint transformers would not load.
TEST(PeftNames, PeftKeysInAModelCheckpoint) {
  for (const char* key : {"model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
                          "lm_head.weight", "model.embed_tokens.weight"})
    EXPECT_FALSE(is_peft_key(key)) << key;
  for (const char* key :
       {"base_model.model.model.norm.weight", "model.layers.0.self_attn.q_proj.base_layer.weight",
        "model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "lm_head.modules_to_save.default.weight",
        "model.embed_tokens.token_adapter.trainable_tokens_delta"})
    EXPECT_TRUE(is_peft_key(key)) << key;
}

// Every key of every fixture adapter (all written by peft 0.21's save_pretrained) parses, with
// the prefix and without an adapter name.
TEST(PeftNames, EveryKeyOfTheFixtureAdaptersParses) {
  const fs::path root = fs::path(NANSCOPE_FIXTURES) / "adapters";
  size_t keys = 0;
  for (const auto& d : fs::directory_iterator(root)) {
    const fs::path f = d.path() / "adapter_model.safetensors";
    if (!fs::exists(f)) continue;
    auto file = SafetensorsFile::open(f);
    for (const TensorInfo& t : file->tensors()) {
      SCOPED_TRACE(f.string() + ": " + t.name);
      const std::optional<PeftName> n = parse_peft_name(t.name);
      ASSERT_TRUE(n);
      EXPECT_TRUE(n->prefixed);
      EXPECT_TRUE(n->adapter.empty());
      EXPECT_FALSE(n->module.empty());
      ++keys;
    }
  }
  EXPECT_GT(keys, 100u);
}
