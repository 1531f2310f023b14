// nanscope merge against goldens made by the real peft 0.21 (tools/fixtures/make_merge_goldens.py):
// every tensor of every case compared with peft's merge_and_unload(), the refusal cases, the
// atomicity of the output directory, and the fidelity numbers.
//
// The goldens live in NANSCOPE_FIXTURES/{models,adapters,merged}; NANSCOPE_MERGE_GOLDENS=DIR
// points the tests at another root with the same three folders. Missing goldens FAIL (they do
// not skip): the comparison with peft is the point of these tests.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "common/error.hpp"
#include "formats/checkpoint.hpp"
#include "formats/hf_config.hpp"
#include "synthetic_model.hpp"
#include "tools/merge.hpp"

using namespace nanscope;
namespace fs = std::filesystem;

namespace {

fs::path golden_root() {
  if (const char* e = std::getenv("NANSCOPE_MERGE_GOLDENS")) return e;
  return NANSCOPE_FIXTURES;
}

struct ScratchDir {
  fs::path path;
  ScratchDir() {
    static int n = 0;
    path = fs::temp_directory_path() /
           ("nanscope-merge-test-" + std::to_string(::getpid()) + "-" + std::to_string(n++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

struct CaseInfo {
  std::string base;
  std::string expect;
};

// Reads the case's description; an ADD_FAILURE names what is missing and how to make it.
std::optional<CaseInfo> load_case(const std::string& name) {
  const fs::path root = golden_root();
  const fs::path cj = root / "adapters" / name / "case.json";
  const fs::path md = root / "merged" / name / "config.json";
  if (!fs::exists(cj) || !fs::exists(md)) {
    ADD_FAILURE() << "merge golden `" << name << "` is missing under " << root
                  << " (expected adapters/" << name << "/case.json and merged/" << name
                  << "/config.json). Make them on a machine with torch/transformers/peft: "
                     "python3 tools/fixtures/make_merge_goldens.py --models tests/fixtures/models "
                     "--adapters tests/fixtures/adapters --merged tests/fixtures/merged";
    return std::nullopt;
  }
  nlohmann::json j = read_json_file(cj);
  CaseInfo c{j.at("base").get<std::string>(), j.at("expect").get<std::string>()};
  if (!fs::exists(root / "models" / c.base / "config.json")) {
    ADD_FAILURE() << "base model " << (root / "models" / c.base) << " of case " << name
                  << " is missing (tools/fixtures/make_models.py, then make_merge_goldens.py)";
    return std::nullopt;
  }
  return c;
}

MergeOptions options_for(const std::string& name, const CaseInfo& c, const fs::path& out) {
  MergeOptions o;
  o.base = golden_root() / "models" / c.base;
  o.adapter = golden_root() / "adapters" / name;
  o.out = out;
  o.threads = 2;
  return o;
}

// Distance in units in the last place between two values of the same float dtype (raw bits).
uint64_t ulp_distance(uint32_t a, uint32_t b, int bits) {
  auto ordered = [bits](uint32_t u) -> int64_t {
    const uint32_t sign = 1u << (bits - 1);
    return (u & sign) ? -int64_t(u & (sign - 1)) : int64_t(u);
  };
  const int64_t d = ordered(a) - ordered(b);
  return uint64_t(d < 0 ? -d : d);
}

bool is_nan_bits(uint32_t u, DType t) {
  if (t == DType::F32) return (u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu);
  if (t == DType::BF16) return (u & 0x7f80u) == 0x7f80u && (u & 0x7fu);
  return (u & 0x7c00u) == 0x7c00u && (u & 0x3ffu);
}

struct Compare {
  uint64_t elements = 0, identical = 0, max_ulp = 0;
  std::string worst_tensor;
};

// Compares tensor `a` of checkpoint A with tensor `b` of checkpoint B, element by element.
void compare_tensor(const TensorRef& a, const TensorRef& b, const std::string& label, Compare& c) {
  ASSERT_EQ(a.info->dtype, b.info->dtype) << label;
  ASSERT_EQ(a.info->shape, b.info->shape) << label;
  const DType t = a.info->dtype;
  const int bits = dtype_bits(t);
  auto x = a.bytes(), y = b.bytes();
  ASSERT_EQ(x.size(), y.size()) << label;
  if (!is_float_computable(t)) {
    EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size())) << label;
    return;
  }
  const size_t n = x.size() / size_t(bits / 8);
  for (size_t i = 0; i < n; ++i) {
    uint32_t u = 0, v = 0;
    std::memcpy(&u, x.data() + i * size_t(bits / 8), size_t(bits / 8));
    std::memcpy(&v, y.data() + i * size_t(bits / 8), size_t(bits / 8));
    ++c.elements;
    if (u == v || (is_nan_bits(u, t) && is_nan_bits(v, t))) {
      ++c.identical;
      continue;
    }
    const uint64_t d = ulp_distance(u, v, bits);
    if (d > c.max_ulp) c.max_ulp = d, c.worst_tensor = label;
  }
}

// Every tensor of the golden against ours (ours may hold more: an untied lm_head).
Compare compare_with_golden(const fs::path& ours, const std::string& name) {
  Compare c;
  Checkpoint a = Checkpoint::open(ours);
  Checkpoint g = Checkpoint::open(golden_root() / "merged" / name);
  for (const auto& [tn, ref] : g.tensors()) {
    auto mine = a.find(tn);
    EXPECT_TRUE(mine.has_value()) << name << ": our merge lacks " << tn;
    if (mine) compare_tensor(*mine, ref, name + ":" + tn, c);
  }
  return c;
}

void expect_close_to_peft(const Compare& c, const std::string& name) {
  ASSERT_GT(c.elements, 0u) << name;
  const double frac = double(c.identical) / double(c.elements);
  EXPECT_GE(frac, 0.999) << name << ": only " << c.identical << " of " << c.elements
                         << " elements bit-identical to peft (worst " << c.worst_tensor << ")";
  EXPECT_LE(c.max_ulp, 1u) << name << ": " << c.max_ulp << " ulp from peft in " << c.worst_tensor;
}

// For tensors where peft rounds twice (an embedding's update is rounded before the add), ulps are
// the wrong yardstick near cancellation. Instead: ours must be exactly round(S), S the fp32 merge,
// and never farther from S than peft's value.
void expect_correctly_rounded(const fs::path& ours_dir, const fs::path& fp32_dir,
                              const std::string& name, const std::string& tensor) {
  Checkpoint a = Checkpoint::open(ours_dir), f = Checkpoint::open(fp32_dir);
  Checkpoint g = Checkpoint::open(golden_root() / "merged" / name);
  TensorRef x = a.get(tensor), s = f.get(tensor), y = g.get(tensor);
  ASSERT_EQ(s.info->dtype, DType::F32);
  const DType t = x.info->dtype;
  const size_t n = x.info->numel();
  std::vector<float> vx(n), vs(n), vy(n);
  load_to_f32(x.bytes().data(), t, vx.data(), n);
  load_to_f32(s.bytes().data(), DType::F32, vs.data(), n);
  load_to_f32(y.bytes().data(), y.info->dtype, vy.data(), n);
  size_t not_rounded = 0, worse = 0, differ = 0;
  for (size_t i = 0; i < n; ++i) {
    if (vx[i] != round_to(vs[i], t)) ++not_rounded;
    if (std::abs(double(vx[i]) - vs[i]) > std::abs(double(vy[i]) - vs[i])) ++worse;
    if (vx[i] != vy[i]) ++differ;
  }
  EXPECT_EQ(not_rounded, 0u) << name << ":" << tensor;
  EXPECT_EQ(worse, 0u) << name << ":" << tensor << " farther from the fp32 result than peft";
  ::testing::Test::RecordProperty(name + ":" + tensor + ":differs_from_peft", int(differ));
}

const char* kOkCases[] = {"lora-bf16", "lora-fp32", "lora-fp16", "rslora", "patterns", "dora",
                          "dora-embed", "embed-tied", "lmhead-tied", "embed-lmhead-untied",
                          "modules-to-save", "lora-bias", "bias-all", "bias-lora-only", "layers",
                          "regex", "trainable-tokens", "sharded", "scale-odd", "scale-odd-fp32",
                          "rslora-odd",
                          // one LoRA per family beyond Qwen/Llama
                          "family-mistral", "family-gemma2", "family-gemma3", "family-phi3",
                          "family-qwen3-moe", "family-mixtral"};

}  // namespace

// ---- peft parity: TiedMode::Peft + peft's embedding rounding reproduce merge_and_unload
// ----------

class MergeGolden : public ::testing::TestWithParam<const char*> {};

TEST_P(MergeGolden, MatchesPeftMergeAndUnload) {
  const std::string name = GetParam();
  auto c = load_case(name);
  if (!c) return;
  ASSERT_EQ(c->expect, "ok");
  ScratchDir d;
  MergeOptions o = options_for(name, *c, d.path / "out");
  o.tied = TiedMode::Peft;
  o.peft_embedding_rounding = true;
  MergeResult r = merge(o);
  ASSERT_TRUE(r.written) << merge_summary(r);
  EXPECT_FALSE(r.refused);
  EXPECT_GT(r.merged + r.replaced, 0);
  Compare cmp = compare_with_golden(d.path / "out", name);
  expect_close_to_peft(cmp, name);
  ::testing::Test::RecordProperty(
      "identical", std::to_string(cmp.identical) + "/" + std::to_string(cmp.elements));
  // config.json: dtype and tie flag as transformers wrote them after peft's merge.
  auto mine = read_json_file(d.path / "out" / "config.json");
  auto gold = read_json_file(golden_root() / "merged" / name / "config.json");
  EXPECT_EQ(mine.value("tie_word_embeddings", false), gold.value("tie_word_embeddings", false));
  EXPECT_EQ(mine.at("dtype"), gold.at("dtype"));
  // Side files of the base are carried over.
  for (const auto& e : fs::directory_iterator(golden_root() / "models" / c->base)) {
    const std::string f = e.path().filename().string();
    if (f == "generation_config.json" || f == "tokenizer.json" || f == "tokenizer_config.json") {
      EXPECT_TRUE(fs::exists(d.path / "out" / f)) << name << ": " << f << " not copied";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Peft, MergeGolden, ::testing::ValuesIn(kOkCases), [](const auto& p) {
  std::string s = p.param;
  for (char& ch : s)
    if (ch == '-') ch = '_';
  return s;
});

// ---- the default: untie when the adapter changes a tied embedding; peft's roundings ------------

class MergeDefault : public ::testing::TestWithParam<const char*> {};

TEST_P(MergeDefault, WithinOneUlpOfPeft) {
  const std::string name = GetParam();
  if (name == "embed-tied" || name == "lmhead-tied") return;  // semantics differ: tests below
  auto c = load_case(name);
  if (!c) return;
  ScratchDir d;
  MergeResult r = merge(options_for(name, *c, d.path / "out"));
  ASSERT_TRUE(r.written);
  const bool embed_lora =
      fs::exists(golden_root() / "adapters" / name / "adapter_model.safetensors") && [&] {
        auto f =
            SafetensorsFile::open(golden_root() / "adapters" / name / "adapter_model.safetensors");
        return f->find("base_model.model.model.embed_tokens.lora_embedding_A") != nullptr &&
               f->find("base_model.model.model.embed_tokens.lora_magnitude_vector") == nullptr;
      }();
  Compare cmp;
  Checkpoint a = Checkpoint::open(d.path / "out");
  Checkpoint g = Checkpoint::open(golden_root() / "merged" / name);
  for (const auto& [tn, ref] : g.tensors()) compare_tensor(a.get(tn), ref, name + ":" + tn, cmp);
  EXPECT_LE(cmp.max_ulp, 1u) << name << " worst " << cmp.worst_tensor;
  if (embed_lora) {
    // With peft's embedding rounding off, one rounding: exactly round(S), never farther from S.
    MergeOptions one = options_for(name, *c, d.path / "one");
    one.peft_embedding_rounding = false;
    ASSERT_TRUE(merge(one).written);
    MergeOptions o = options_for(name, *c, d.path / "fp32");
    o.dtype = DType::F32;
    ASSERT_TRUE(merge(o).written);
    expect_correctly_rounded(d.path / "one", d.path / "fp32", name, "model.embed_tokens.weight");
  }
}

INSTANTIATE_TEST_SUITE_P(OneRounding, MergeDefault, ::testing::ValuesIn(kOkCases),
                         [](const auto& p) {
                           std::string s = p.param;
                           for (char& ch : s)
                             if (ch == '-') ch = '_';
                           return s;
                         });

// A LoRA on lm_head of a tied model: the output projection changes, the input embedding does not.
TEST(MergeTied, LmHeadLoraUntiesByDefault) {
  auto c = load_case("lmhead-tied");
  if (!c) return;
  ScratchDir d;
  MergeResult r = merge(options_for("lmhead-tied", *c, d.path / "out"));
  ASSERT_TRUE(r.written);
  EXPECT_TRUE(r.base_tied);
  EXPECT_TRUE(r.untied);
  EXPECT_FALSE(r.tie_word_embeddings);
  EXPECT_FALSE(
      read_json_file(d.path / "out" / "config.json").at("tie_word_embeddings").get<bool>());
  Checkpoint ours = Checkpoint::open(d.path / "out");
  Checkpoint base = Checkpoint::open(golden_root() / "models" / c->base);
  Checkpoint gold = Checkpoint::open(golden_root() / "merged" / "lmhead-tied");
  Compare emb, head;
  compare_tensor(ours.get("model.embed_tokens.weight"), base.get("model.embed_tokens.weight"),
                 "embed vs base", emb);
  EXPECT_EQ(emb.identical, emb.elements) << "the embedding must stay the base's";
  // peft put W + dW into the shared tensor: that is what lm_head must hold.
  compare_tensor(ours.get("lm_head.weight"), gold.get("model.embed_tokens.weight"),
                 "lm_head vs peft", head);
  expect_close_to_peft(head, "lmhead-tied lm_head");
}

TEST(MergeTied, EmbeddingLoraUntiesByDefault) {
  auto c = load_case("embed-tied");
  if (!c) return;
  ScratchDir d;
  MergeResult r = merge(options_for("embed-tied", *c, d.path / "out"));
  ASSERT_TRUE(r.written);
  EXPECT_TRUE(r.untied);
  Checkpoint ours = Checkpoint::open(d.path / "out");
  Checkpoint base = Checkpoint::open(golden_root() / "models" / c->base);
  Compare head, emb;
  compare_tensor(ours.get("lm_head.weight"), base.get("model.embed_tokens.weight"),
                 "lm_head vs base", head);
  EXPECT_EQ(head.identical, head.elements) << "lm_head must stay the base embedding";
  // The embedding holds peft's value (its update rounded before the add, as peft does).
  Checkpoint gold = Checkpoint::open(golden_root() / "merged" / "embed-tied");
  compare_tensor(ours.get("model.embed_tokens.weight"), gold.get("model.embed_tokens.weight"),
                 "embed vs peft", emb);
  EXPECT_EQ(emb.identical, emb.elements);
  MergeOptions one = options_for("embed-tied", *c, d.path / "one");
  one.peft_embedding_rounding = false;
  ASSERT_TRUE(merge(one).written);
  MergeOptions o = options_for("embed-tied", *c, d.path / "fp32");
  o.dtype = DType::F32;
  ASSERT_TRUE(merge(o).written);
  expect_correctly_rounded(d.path / "one", d.path / "fp32", "embed-tied",
                           "model.embed_tokens.weight");
}

// ---- embedding LoRA on a bf16 base: peft's rounding, bit for bit, by default -------------------
// peft 0.21 merges a linear layer as W' = bf16(W + dW) (Linear.merge adds the fp32 delta: one
// rounding) but an embedding as W' = bf16(W + bf16(dW)) (Embedding.merge adds
// `get_delta_weight(...).to(orig_dtype)`: the update is rounded first). The default merge must
// give peft's bytes for every tensor, embed_tokens included.

namespace {

void expect_bit_identical_by_default(const std::string& name) {
  auto c = load_case(name);
  if (!c) return;
  ASSERT_EQ(c->expect, "ok");
  ScratchDir d;
  MergeResult r = merge(options_for(name, *c, d.path / "out"));  // the defaults, as the CLI
  ASSERT_TRUE(r.written) << merge_summary(r);
  Compare all = compare_with_golden(d.path / "out", name);
  ASSERT_GT(all.elements, 0u);
  EXPECT_EQ(all.identical, all.elements)
      << name << ": " << all.elements - all.identical << " elements differ from peft (worst "
      << all.worst_tensor << ", " << all.max_ulp << " ulp)";
  Compare emb;
  compare_tensor(Checkpoint::open(d.path / "out").get("model.embed_tokens.weight"),
                 Checkpoint::open(golden_root() / "merged" / name).get("model.embed_tokens.weight"),
                 name + ":embed", emb);
  EXPECT_EQ(emb.identical, emb.elements) << name << ": embed_tokens differs from peft";
}

}  // namespace

// Already in the goldens: llama-tiny (bf16, untied), LoRA on embed_tokens, lm_head, q_proj.
TEST(MergeEmbeddingRounding, EmbedLmheadUntiedMatchesPeftBitForBit) {
  expect_bit_identical_by_default("embed-lmhead-untied");
}

// The report: untied Llama in bf16, LoRA on embed_tokens, q_proj, v_proj, modules_to_save
// ["lm_head"]. Golden case `embed-modules-to-save` of tools/fixtures/make_merge_goldens.py.
TEST(MergeEmbeddingRounding, EmbedModulesToSaveMatchesPeftBitForBit) {
  expect_bit_identical_by_default("embed-modules-to-save");
}

// The same with the LoRA tensors stored in bf16: peft upcasts them to fp32 at load
// (autocast_adapter_dtype), so the roundings are the same. Golden case
// `embed-modules-to-save-bf16-adapter`.
TEST(MergeEmbeddingRounding, Bf16StoredAdapterMatchesPeftBitForBit) {
  const std::string name = "embed-modules-to-save-bf16-adapter";
  const fs::path f = golden_root() / "adapters" / name / "adapter_model.safetensors";
  if (fs::exists(f)) {
    auto file = SafetensorsFile::open(f);
    const TensorInfo* a = file->find("base_model.model.model.embed_tokens.lora_embedding_A");
    ASSERT_NE(a, nullptr);
    EXPECT_EQ(a->dtype, DType::BF16) << "the fixture should store its LoRA tensors in bf16";
  }
  expect_bit_identical_by_default(name);
}

// ---- refusals
// -------------------------------------------------------------------------------------

TEST(MergeRefuse, PoisonedAdapterIsRefusedNamingTheAdapterTensor) {
  auto c = load_case("poisoned");
  if (!c) return;
  ASSERT_EQ(c->expect, "refuse_adapter");
  ScratchDir d;
  MergeResult r = merge(options_for("poisoned", *c, d.path / "out"));
  EXPECT_TRUE(r.refused);
  EXPECT_FALSE(r.written);
  EXPECT_FALSE(fs::exists(d.path / "out"));
  EXPECT_TRUE(fs::is_empty(d.path)) << "temporary directory left behind";
  ASSERT_EQ(r.nonfinite.size(), 1u) << merge_summary(r);
  EXPECT_EQ(r.nonfinite[0].tensor, "model.layers.1.self_attn.q_proj.weight");
  EXPECT_EQ(r.nonfinite[0].cause, "adapter");
  ASSERT_EQ(r.nonfinite[0].adapter_tensors.size(), 1u);
  EXPECT_EQ(r.nonfinite[0].adapter_tensors[0],
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight");
  auto j = merge_result_json(r);
  EXPECT_TRUE(j.at("refused").get<bool>());
  EXPECT_EQ(j.at("nonfinite")[0].at("cause"), "adapter");
  EXPECT_NE(merge_summary(r).find("REFUSED"), std::string::npos);
}

TEST(MergeRefuse, Fp16OverflowIsRefusedNamingTheArithmetic) {
  auto c = load_case("fp16-overflow");
  if (!c) return;
  ASSERT_EQ(c->expect, "refuse_arithmetic");
  ScratchDir d;
  MergeResult r = merge(options_for("fp16-overflow", *c, d.path / "out"));
  EXPECT_TRUE(r.refused);
  EXPECT_FALSE(fs::exists(d.path / "out"));
  ASSERT_EQ(r.nonfinite.size(), 1u) << merge_summary(r);
  EXPECT_EQ(r.nonfinite[0].tensor, "model.layers.0.self_attn.v_proj.weight");
  EXPECT_EQ(r.nonfinite[0].cause, "arithmetic");
  EXPECT_EQ(r.nonfinite[0].count, 6u);  // B[0:3, 0] x A[0, 0:2] = 300 * 300 * scale
}

TEST(MergeRefuse, AllowNonfiniteWritesWhatPeftWrites) {
  for (const char* name : {"poisoned", "fp16-overflow"}) {
    auto c = load_case(name);
    if (!c) continue;
    ScratchDir d;
    MergeOptions o = options_for(name, *c, d.path / "out");
    o.allow_nonfinite = true;
    o.tied = TiedMode::Peft;
    MergeResult r = merge(o);
    EXPECT_TRUE(r.written) << name;
    EXPECT_FALSE(r.refused) << name;
    EXPECT_EQ(r.nonfinite.size(), 1u) << name;
    expect_close_to_peft(compare_with_golden(d.path / "out", name), name);
  }
}

// ---- atomicity
// ------------------------------------------------------------------------------------

TEST(MergeAtomic, RefusesANonEmptyOutAndLeavesItAlone) {
  auto c = load_case("lora-bf16");
  if (!c) return;
  ScratchDir d;
  fs::create_directories(d.path / "out");
  { std::ofstream(d.path / "out" / "precious.txt") << "keep me"; }
  try {
    merge(options_for("lora-bf16", *c, d.path / "out"));
    ADD_FAILURE() << "merge into a non-empty directory did not throw";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("not empty"), std::string::npos) << e.what();
  }
  std::ifstream f(d.path / "out" / "precious.txt");
  std::string s;
  std::getline(f, s);
  EXPECT_EQ(s, "keep me");
}

TEST(MergeAtomic, AnEmptyOutDirectoryIsFilled) {
  auto c = load_case("lora-bf16");
  if (!c) return;
  ScratchDir d;
  fs::create_directories(d.path / "out");
  MergeResult r = merge(options_for("lora-bf16", *c, d.path / "out"));
  EXPECT_TRUE(r.written);
  EXPECT_TRUE(fs::exists(d.path / "out" / "model.safetensors"));
}

TEST(MergeAtomic, InterruptRemovesTheTemporaryDirectory) {
  auto c = load_case("lora-bf16");
  if (!c) return;
  ScratchDir d;
  std::atomic<bool> stop{false};
  MergeOptions o = options_for("lora-bf16", *c, d.path / "out");
  o.cancel = &stop;
  o.progress = [&](const std::string&, size_t i, size_t) {
    if (i == 3) stop = true;
  };
  EXPECT_THROW(merge(o), InputError);
  EXPECT_FALSE(fs::exists(d.path / "out"));
  EXPECT_TRUE(fs::is_empty(d.path)) << "temporary directory left behind";
}

TEST(MergeAtomic, BadAdapterLeavesNothing) {
  ScratchDir d;
  fs::create_directories(d.path / "adapter");
  { std::ofstream(d.path / "adapter" / "adapter_config.json") << R"({"peft_type": "IA3"})"; }
  MergeOptions o;
  o.base = golden_root() / "models" / "qwen3-tiny";
  o.adapter = d.path / "adapter";
  o.out = d.path / "out";
  EXPECT_THROW(merge(o), InputError);
  EXPECT_FALSE(fs::exists(d.path / "out"));
}

// ---- sharding and fidelity
// ------------------------------------------------------------------------

TEST(MergeShards, ShardedLikeTheBaseWithAnIndex) {
  auto c = load_case("sharded");
  if (!c) return;
  ScratchDir d;
  MergeResult r = merge(options_for("sharded", *c, d.path / "out"));
  ASSERT_TRUE(r.written);
  Checkpoint base = Checkpoint::open(golden_root() / "models" / c->base);
  EXPECT_EQ(r.shards.size(), base.files().size());
  auto idx = read_json_file(d.path / "out" / "model.safetensors.index.json");
  auto bidx = read_json_file(golden_root() / "models" / c->base / "model.safetensors.index.json");
  EXPECT_EQ(idx.at("weight_map"), bidx.at("weight_map"));  // same shard membership
  Checkpoint ours = Checkpoint::open(d.path / "out");
  EXPECT_EQ(idx.at("metadata").at("total_size").get<uint64_t>(), ours.total_bytes());
}

TEST(MergeShards, MaxShardSizeSplitsGreedily) {
  auto c = load_case("lora-bf16");
  if (!c) return;
  ScratchDir d;
  MergeOptions o = options_for("lora-bf16", *c, d.path / "out");
  o.max_shard_size = 200 * 1024;
  MergeResult r = merge(o);
  ASSERT_TRUE(r.written);
  EXPECT_GT(r.shards.size(), 1u);
  Checkpoint ours = Checkpoint::open(d.path / "out");
  EXPECT_TRUE(ours.sharded());
  expect_close_to_peft(compare_with_golden(d.path / "out", "lora-bf16"), "lora-bf16 resharded");
}

TEST(MergeFidelity, Fp32KeepsEverythingBf16LosesSome) {
  auto c32 = load_case("lora-fp32");
  auto c16 = load_case("lora-bf16");
  if (!c32 || !c16) return;
  ScratchDir d;
  MergeResult a = merge(options_for("lora-fp32", *c32, d.path / "a"));
  EXPECT_EQ(a.kept, 1.0);
  EXPECT_EQ(a.projected, 1.0);
  EXPECT_EQ(a.relative_error, 0.0);
  EXPECT_EQ(a.lost, 0u);
  EXPECT_EQ(a.out_dtype, DType::F32);
  MergeResult b = merge(options_for("lora-bf16", *c16, d.path / "b"));
  // bf16 rounding changes the update: `kept` (the norm ratio of interface.md) moves away from 1
  // (rounding noise can push it ABOVE 1 when dW is large against an ulp, as in these goldens),
  // some elements of the update are lost entirely, and the error is > 0.
  EXPECT_NE(b.kept, 1.0);
  EXPECT_GT(b.lost, 0u);
  EXPECT_NEAR(b.projected, 1.0, 0.05);
  EXPECT_GT(b.relative_error, 0.0);
  EXPECT_LT(b.relative_error, 0.5);
  EXPECT_EQ(b.merged, 21);  // 7 projections x 3 layers
  EXPECT_GT(b.copied, 0);
  auto j = merge_result_json(b);
  EXPECT_EQ(j.at("out_dtype"), "bf16");
  EXPECT_TRUE(j.at("fidelity").contains("kept"));
  EXPECT_LE(j.at("fidelity").at("worst").size(), 5u);
  // --dtype fp32 from a bf16 base keeps the whole update.
  MergeOptions o = options_for("lora-bf16", *c16, d.path / "c");
  o.dtype = DType::F32;
  MergeResult f = merge(o);
  EXPECT_EQ(f.kept, 1.0);
  EXPECT_EQ(read_json_file(d.path / "c" / "config.json").at("dtype"), "float32");
}

// The fidelity figures against a plain double-precision recomputation from the files: the base
// W0, the stored result r (bf16) and the ideal S (the same merge written in fp32). Rows of 1024
// and 2048 columns run the fast kernel's fp32 lanes through many flushes into the double sums;
// planted inf/NaN in the base send their chunks down the exact path, whose elements must be left
// out of the figures and counted as non-finite.
TEST(MergeFidelity, FiguresMatchADoubleRecomputation) {
  using namespace nanscope::testing;
  ScratchDir d;
  nlohmann::json cfg = tiny_qwen3_config();
  cfg["hidden_size"] = 1024;
  cfg["intermediate_size"] = 2048;
  cfg["num_hidden_layers"] = 1;
  cfg["num_attention_heads"] = 8;
  cfg["num_key_value_heads"] = 2;
  cfg["head_dim"] = 128;
  uint64_t seed = 12345;
  auto uniform = [&] {  // deterministic values in [-1, 1)
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    return float(int64_t(seed >> 40) - (int64_t(1) << 23)) / float(1 << 23);
  };
  std::vector<PlantedTensor> ts = expected_planted(cfg, DType::BF16);
  for (auto& t : ts) {
    size_t n = 1;
    for (auto x : t.shape) n *= size_t(x);
    t.values.resize(n);
    for (auto& v : t.values) v = 0.05f * uniform();
    if (t.name == "model.layers.0.mlp.down_proj.weight") {
      t.values[5] = std::numeric_limits<float>::infinity();
      t.values[3000] = std::numeric_limits<float>::quiet_NaN();
    }
  }
  write_model(d.path / "base", cfg, ts);
  const int r = 8;
  std::vector<PlantedTensor> lora;
  for (const auto& [mod, out, in] :
       {std::tuple{"self_attn.q_proj", 1024, 1024}, std::tuple{"mlp.down_proj", 1024, 2048}}) {
    const std::string pre = std::string("base_model.model.model.layers.0.") + mod;
    PlantedTensor a{pre + ".lora_A.weight", DType::F32, {r, in}, {}};
    PlantedTensor b{pre + ".lora_B.weight", DType::F32, {out, r}, {}};
    for (int64_t i = 0; i < int64_t(r) * in; ++i) a.values.push_back(0.1f * uniform());
    for (int64_t i = 0; i < int64_t(out) * r; ++i) b.values.push_back(0.01f * uniform());
    lora.push_back(a);
    lora.push_back(b);
  }
  fs::create_directories(d.path / "adapter");
  write_json(d.path / "adapter" / "adapter_config.json",
             {{"peft_type", "LORA"},
              {"r", r},
              {"lora_alpha", 20},
              {"target_modules", {"q_proj", "down_proj"}}});
  write_tensors(d.path / "adapter" / "adapter_model.safetensors", lora);

  MergeOptions o;
  o.base = d.path / "base";
  o.adapter = d.path / "adapter";
  o.out = d.path / "bf16";
  o.threads = 2;
  o.allow_nonfinite = true;
  const MergeResult got = merge(o);
  ASSERT_TRUE(got.written);
  o.out = d.path / "fp32";
  o.dtype = DType::F32;
  ASSERT_TRUE(merge(o).written);

  Checkpoint base = Checkpoint::open(d.path / "base");
  Checkpoint stored = Checkpoint::open(d.path / "bf16"), ideal = Checkpoint::open(d.path / "fp32");
  double num = 0, den = 0, dot = 0, err = 0;
  uint64_t updated = 0, lost = 0, nonfinite = 0;
  for (const char* name :
       {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"}) {
    auto load = [&](Checkpoint& c) {
      TensorRef t = c.get(name);
      std::vector<float> v(t.info->numel());
      load_to_f32(t.bytes().data(), t.info->dtype, v.data(), v.size());
      return v;
    };
    const std::vector<float> w = load(base), rr = load(stored), s = load(ideal);
    for (size_t i = 0; i < w.size(); ++i) {
      if (!std::isfinite(rr[i])) ++nonfinite;
      if (!std::isfinite(w[i]) || !std::isfinite(s[i]) || s[i] == w[i]) continue;
      const double di = double(s[i]) - w[i], dk = double(rr[i]) - w[i];
      num += dk * dk, den += di * di, dot += dk * di, err += (dk - di) * (dk - di);
      ++updated;
      if (rr[i] == w[i]) ++lost;
    }
  }
  ASSERT_GT(updated, 2000000u);
  EXPECT_EQ(got.update_elements, updated);
  EXPECT_EQ(got.lost, lost);
  EXPECT_GT(lost, 0u);
  EXPECT_NEAR(got.kept, std::sqrt(num / den), 1e-6);
  EXPECT_NEAR(got.projected, dot / den, 1e-6);
  EXPECT_NEAR(got.relative_error, std::sqrt(err / den), 1e-6 * std::sqrt(err / den));
  ASSERT_EQ(got.nonfinite.size(), 1u);
  EXPECT_EQ(got.nonfinite[0].count, nonfinite);
  EXPECT_EQ(got.nonfinite[0].cause, "base");
}
