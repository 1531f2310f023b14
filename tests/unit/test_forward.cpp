// The forward pass against transformers: every golden of tools/fixtures/make_trace_goldens.py
// (hidden states, logits, per-module sites), for every model, dtype and attention profile.
// A golden that is absent FAILS with the command that makes it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "formats/checkpoint.hpp"
#include "formats/safetensors.hpp"
#include "model/forward.hpp"
#include "model/rope.hpp"
#include "numerics/kernels.hpp"
#include "golden_util.hpp"

namespace nanscope {
namespace {

namespace fs = std::filesystem;

const fs::path kModels = fs::path(NANSCOPE_FIXTURES) / "models";
// NANSCOPE_TRACE_GOLDENS points elsewhere (goldens made on another machine, not committed).
const fs::path kGoldens = std::getenv("NANSCOPE_TRACE_GOLDENS")
                              ? fs::path(std::getenv("NANSCOPE_TRACE_GOLDENS"))
                              : fs::path(NANSCOPE_FIXTURES) / "goldens" / "trace";
const char* kMakeGoldens =
    "python3 tools/fixtures/make_trace_goldens.py --models tests/fixtures/models --out "
    "tests/fixtures/goldens/trace";

// The models transformers can load (the script skips the same ones).
std::vector<std::string> golden_models() {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(kModels, ec)) {
    const std::string n = e.path().filename().string();
    if (!e.is_directory() || !fs::exists(e.path() / "config.json")) continue;
    // Damaged checkpoints transformers cannot load; the trained model and the eos variant have
    // generation goldens of their own (test_generate.cpp).
    if (n.find("missing") != std::string::npos || n.find("truncated") != std::string::npos ||
        n.find("peftkeys") != std::string::npos || n.rfind("trained-", 0) == 0 ||
        n.ends_with("-eos"))
      continue;
    out.push_back(n);
  }
  std::sort(out.begin(), out.end());
  return out;
}


// Relative norm-wise tolerance per run dtype: the rounding-noise floor. A different fp32
// accumulation order in a matmul flips a near-tie rounding now and then (1 in ~1000 fp16
// outputs, far fewer in bf16), and a flip propagates through the later layers. Observed
// maxima over all goldens (torch 2.11 / transformers 5.17, AVX512): fp32 6e-7, bf16 2.4e-5,
// fp16 7e-4.
double tolerance(DType dt) {
  return dt == DType::F32 ? 1e-5 : dt == DType::BF16 ? 1e-4 : 1e-3;
}

// A first difference that is a rounding flip: at most max(2, n / 200) elements differ, each by
// at most one unit in the last place of the run dtype.
bool is_flip(const std::vector<float>& ours, const std::vector<float>& gold, DType dt) {
  const int mantissa = dt == DType::BF16 ? 7 : 10;
  size_t differing = 0;
  for (size_t i = 0; i < gold.size(); ++i) {
    if (std::memcmp(&ours[i], &gold[i], 4) == 0) continue;
    const double a = std::fabs(double(ours[i])), b = std::fabs(double(gold[i]));
    if (!std::isfinite(a) || !std::isfinite(b)) return false;
    if (std::fabs(double(ours[i]) - double(gold[i])) > std::ldexp(std::max(a, b), -mantissa))
      return false;
    ++differing;
  }
  return differing <= std::max<size_t>(2, gold.size() / 200);
}

// What one flip becomes after a few layers of a tiny model (observed up to 2.4e-3 in bf16).
double propagated_flip_tolerance(DType dt) {
  return dt == DType::BF16 ? 1e-2 : 5e-3;
}

// Hidden-state goldens where one such flip, located and checked to be one by the per-site
// goldens (SiteGolden below), propagates through a tiny model to a larger norm-wise error:
// gemma2-tiny bf16 (one element of layer 0's up_proj, amplified by the sandwich norms and the
// soft-capping: 2.4e-3), qwen2-moe-tiny bf16 (one element of the final norm: 4.4e-4),
// qwen3-moe-tiny bf16 on the AMX machine (one element of layer 0's v_proj: 3.7e-3). Which
// element flips depends on the processor's kernel; the bound is the largest seen times ~1.5.
double tolerance(const std::string& model, DType dt) {
  if (dt == DType::BF16 &&
      (model == "gemma2-tiny" || model == "qwen2-moe-tiny" || model == "qwen3-moe-tiny"))
    return 6e-3;
  return tolerance(dt);
}

class Capture : public Observer {
 public:
  void hidden_state(int64_t, std::span<const float> v, int64_t, int64_t) override {
    hidden.emplace_back(v.begin(), v.end());
  }
  void site(const SiteView& s) override {
    sites[std::string(s.name)] = std::vector<float>(s.values.begin(), s.values.end());
  }
  std::vector<std::vector<float>> hidden;
  std::map<std::string, std::vector<float>> sites;
};

struct Case {
  std::string model, dtype, attn;
  std::string name() const { return model + "__" + dtype + "__" + attn; }
};

std::vector<Case> all_cases() {
  std::vector<Case> v;
  for (const auto& m : golden_models())
    for (const char* d : {"float32", "bfloat16", "float16"})
      for (const char* a : {"eager", "sdpa"}) v.push_back({m, d, a});
  return v;
}

class TraceGolden : public ::testing::TestWithParam<Case> {};

TEST_P(TraceGolden, HiddenStatesAndLogitsMatchTransformers) {
  const Case& c = GetParam();
  const fs::path gp = kGoldens / (c.name() + ".safetensors");
  ASSERT_TRUE(fs::exists(gp)) << "golden " << gp << " is missing; make it with: " << kMakeGoldens;
  Golden g{SafetensorsFile::open(gp)};
  const Checkpoint ck = Checkpoint::open(kModels / c.model);
  const DType dt = dtype_of(c.dtype);
  ForwardOptions opt;
  opt.dtype = dt;
  opt.attention = c.attn == "eager" ? AttentionProfile::Eager : AttentionProfile::Fused;
  Capture cap;
  const std::vector<int64_t> ids = g.ids();
  ForwardResult r = forward(ck, ids, opt, &cap);

  const int64_t N = ck.config().num_hidden_layers;
  ASSERT_EQ(int64_t(cap.hidden.size()), N + 1);
  int64_t total = 0, identical = 0;
  double worst = 0;
  for (int64_t i = 0; i <= N + 1; ++i) {
    const bool logits = i == N + 1;
    const std::string key = logits ? "logits" : "hidden." + std::to_string(i);
    const std::vector<float> gold = g.get(key);
    ASSERT_FALSE(gold.empty()) << key << " missing from " << gp;
    const std::vector<float>& ours = logits ? r.logits : cap.hidden[size_t(i)];
    ASSERT_EQ(ours.size(), gold.size()) << key;
    const Cmp m = compare(ours, gold);
    EXPECT_EQ(m.pattern_mismatch, 0) << key << ": finite/non-finite pattern differs in "
                                     << m.pattern_mismatch << " of " << m.n << " elements";
    EXPECT_LE(m.rel, tolerance(c.model, dt)) << key << ": relative error " << m.rel;
    worst = std::max(worst, m.rel);
    total += m.n;
    identical += m.bit_identical;
  }
  const double frac = double(identical) / double(total);
  std::printf("[ golden   ] %-44s max rel err %.2e, bit-identical %.4f%%\n", c.name().c_str(),
              worst, 100.0 * frac);
  RecordProperty("bit_identical_fraction", std::to_string(frac));
  RecordProperty("max_rel_err", std::to_string(worst));
}

INSTANTIATE_TEST_SUITE_P(Goldens, TraceGolden, ::testing::ValuesIn(all_cases()), [](const auto& p) {
  std::string n = p.param.name();
  std::replace(n.begin(), n.end(), '-', '_');
  return n;
});

// ---- per-site goldens: every module output of transformers' eager forward -------------------
struct SiteCase {
  std::string model, dtype;
};

class SiteGolden : public ::testing::TestWithParam<SiteCase> {};

TEST_P(SiteGolden, EveryModuleOutputMatches) {
  const SiteCase& c = GetParam();
  const std::string stem = c.model + "__" + c.dtype + "__eager__sites";
  const fs::path gp = kGoldens / (stem + ".safetensors");
  ASSERT_TRUE(fs::exists(gp)) << "golden " << gp << " is missing; make it with: " << kMakeGoldens;
  Golden g{SafetensorsFile::open(gp)};
  const Checkpoint ck = Checkpoint::open(kModels / c.model);
  const DType dt = dtype_of(c.dtype);
  ForwardOptions opt;
  opt.dtype = dt;
  Capture cap;
  Golden trace_golden{
      SafetensorsFile::open(kGoldens / (c.model + "__" + c.dtype + "__eager.safetensors"))};
  const std::vector<int64_t> ids = trace_golden.ids();
  forward(ck, ids, opt, &cap);

  // golden module name -> our site name
  // golden module name -> our site name, in the order the forward pass computes them.
  std::vector<std::pair<std::string, std::string>> pairs = {
      {"model.embed_tokens", "model.embed_tokens"}};
  for (int64_t l = 0; l < ck.config().num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    auto same = [&](std::initializer_list<const char*> ms) {
      for (const char* m : ms) pairs.push_back({p + m, p + m});
    };
    same({"input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
          "self_attn.q_norm", "self_attn.k_norm"});
    pairs.push_back({"attn_probs." + std::to_string(l), p + "self_attn.probs"});
    same({"self_attn.o_proj"});
    pairs.push_back({p + "self_attn", p + "self_attn.o_proj"});
    same({"post_attention_layernorm", "pre_feedforward_layernorm", "mlp.gate", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj"});
    // The MLP block's output: down_proj's, or the mixture of experts' own site.
    pairs.push_back({p + "mlp", cap.sites.contains(p + "mlp") ? p + "mlp" : p + "mlp.down_proj"});
    same({"post_feedforward_layernorm"});
    pairs.push_back({"model.layers." + std::to_string(l), p + "residual_mlp"});
  }
  pairs.push_back({"model.norm", "model.norm"});
  pairs.push_back({"lm_head", "lm_head"});
  // In bf16/fp16, everything up to the first site that differs is bit-identical. When that
  // site differs like one near-tie rounding flip (a handful of elements, each one unit in the
  // last place of the run dtype: another accumulation order), the sites after it carry that
  // flip through the remaining layers and are held to the looser bound of a propagated flip
  // instead; any other first difference keeps the strict tolerance everywhere.
  bool propagating = false;
  int64_t checked = 0;
  for (const auto& [gname, ours] : pairs) {
    if (!g.has(gname)) continue;
    auto it = cap.sites.find(ours);
    ASSERT_NE(it, cap.sites.end()) << "no site " << ours;
    std::vector<float> gold = g.get(gname);
    std::vector<float> mine = it->second;
    // Gemma 3 normalises q and k after the transpose to [heads, T, D]; ours are [T, heads, D].
    if (ck.config().model_type == "gemma3_text" &&
        (gname.ends_with("q_norm") || gname.ends_with("k_norm"))) {
      const int64_t D = ck.config().head_dim, T = int64_t(ids.size());
      const int64_t heads = int64_t(gold.size()) / (T * D);
      std::vector<float> t(gold.size());
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < T; ++i)
          std::copy_n(gold.data() + (h * T + i) * D, D, t.data() + (i * heads + h) * D);
      gold = std::move(t);
    }
    // The router's hook sees [tokens, experts] without a batch dimension: the golden keeps
    // its first row.
    if (gname.ends_with("mlp.gate") && gold.size() < mine.size()) mine.resize(gold.size());
    ASSERT_EQ(mine.size(), gold.size()) << gname;
    const Cmp m = compare(mine, gold);
    EXPECT_EQ(m.pattern_mismatch, 0) << gname << ": finite pattern differs";
    if (!propagating && dt != DType::F32 && m.bit_identical < m.n && is_flip(mine, gold, dt)) {
      propagating = true;
      std::printf("[ site     ] %s: first difference at %s looks like a rounding flip\n",
                  c.model.c_str(), gname.c_str());
    }
    EXPECT_LE(m.rel, propagating ? propagated_flip_tolerance(dt) : tolerance(dt)) << gname;
    std::printf("[ site     ] %-14s %-8s %-44s rel %.2e identical %.2f%%\n", c.model.c_str(),
                c.dtype.c_str(), gname.c_str(), m.rel,
                100.0 * double(m.bit_identical) / double(m.n));
    ++checked;
  }
  EXPECT_GT(checked, 10) << "the sites golden holds too few known module names";

  // RoPE: the inv_freq buffer bit for bit, and the cos/sin tables.
  if (g.has("rope.inv_freq") && ck.config().rope_by_layer_type.empty()) {
    const RopeParameters rp = rope_parameters(ck.config(), int64_t(ids.size()));
    EXPECT_EQ(rp.inv_freq, g.get("rope.inv_freq"));
  }
  // (Gemma 3 calls its rotary module once per layer type; the hook keeps one call: the hidden
  // goldens cover its tables.)
  if (g.has("model.rotary_emb.cos") && ck.config().rope_by_layer_type.empty()) {
    const RopeTables tab = rope_tables(ck.config(), int64_t(ids.size()), dt);
    const Cmp mc = compare(tab.cos, g.get("model.rotary_emb.cos"));
    const Cmp ms = compare(tab.sin, g.get("model.rotary_emb.sin"));
    EXPECT_EQ(mc.bit_identical, mc.n);
    EXPECT_EQ(ms.bit_identical, ms.n);
  }
  // act_fn is silu(gate) alone; our mlp.act is round(silu(gate) * up).
  for (int64_t l = 0; l < ck.config().num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".mlp.";
    if (!g.has(p + "act_fn") || !g.has(p + "up_proj")) continue;
    std::vector<float> a = g.get(p + "act_fn"), u = g.get(p + "up_proj");
    for (size_t i = 0; i < a.size(); ++i) a[i] = round_to(a[i] * u[i], dt);
    const Cmp m = compare(cap.sites[p + "act"], a);
    EXPECT_EQ(m.pattern_mismatch, 0) << p << "act";
    EXPECT_LE(m.rel, propagating ? propagated_flip_tolerance(dt) : tolerance(dt)) << p << "act";
  }
}

std::vector<SiteCase> site_cases() {
  std::vector<SiteCase> v;
  for (const char* m : {"qwen3-tiny", "qwen2-tiny", "llama-tiny", "mistral-tiny",
                        "qwen2-tiny-window", "gemma2-tiny", "gemma3-tiny", "phi3-tiny",
                        "phi4-tiny-partial", "qwen3-moe-tiny", "mixtral-tiny", "qwen2-moe-tiny"})
    for (const char* d : {"bfloat16", "float16"}) v.push_back({m, d});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Goldens, SiteGolden, ::testing::ValuesIn(site_cases()), [](const auto& p) {
  std::string n = p.param.model + "__" + p.param.dtype;
  std::replace(n.begin(), n.end(), '-', '_');
  return n;
});

// ---- properties that need no golden -----------------------------------------------------------
TEST(Forward, EmbeddingsInputEqualsIds) {
  const Checkpoint ck = Checkpoint::open(kModels / "qwen3-tiny");
  const std::vector<int64_t> ids = {1, 15, 300, 7};
  const int64_t H = ck.config().hidden_size;
  ForwardOptions opt;
  Capture a, b;
  ForwardResult ra = forward(ck, ids, opt, &a);
  std::vector<float> emb(a.hidden[0]);
  ForwardResult rb = forward_embeddings(ck, emb, int64_t(ids.size()), opt, &b);
  ASSERT_EQ(emb.size(), ids.size() * size_t(H));
  EXPECT_EQ(a.hidden, b.hidden);
  EXPECT_EQ(ra.logits, rb.logits);
}

TEST(Forward, OutOfRangeIdIsAnInputErrorNamingItAndTheVocab) {
  const Checkpoint ck = Checkpoint::open(kModels / "qwen3-tiny");
  const std::vector<int64_t> ids = {1, 5000};
  try {
    forward(ck, ids, ForwardOptions{});
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("5000"), std::string::npos) << m;
    EXPECT_NE(m.find(std::to_string(ck.config().vocab_size)), std::string::npos) << m;
  }
}

TEST(Forward, MissingTensorIsAnInputErrorNamingIt) {
  const Checkpoint ck = Checkpoint::open(kModels / "qwen3-missing");
  try {
    forward(ck, std::vector<int64_t>{1, 2, 3}, ForwardOptions{});
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("is missing"), std::string::npos) << e.what();
  }
}

TEST(Forward, ResultDoesNotDependOnThreadCountOrPageRelease) {
  const Checkpoint ck = Checkpoint::open(kModels / "qwen3-tiny");
  const std::vector<int64_t> ids = {1, 15, 300, 7, 42};
  ForwardOptions a, b;
  b.release_pages = false;
  EXPECT_EQ(forward(ck, ids, a).logits, forward(ck, ids, b).logits);
}

}  // namespace
}  // namespace nanscope

namespace nanscope {
namespace {

// `hidden` runs sequences stacked (forward_batch): each one must come out as it does alone, for
// every family (sliding windows, experts, per-layer RoPE), up to a last-bit difference where a
// product sees another number of rows.
TEST(Forward, BatchOfSequencesEqualsEachAloneInEveryFamily) {
  for (const char* m : {"qwen3-tiny", "qwen2-tiny-window", "mistral-tiny", "gemma2-tiny",
                        "gemma3-tiny", "gemma3-mm-tiny", "phi3-tiny", "phi4-tiny-partial",
                        "qwen3-moe-tiny", "mixtral-tiny", "qwen2-moe-tiny"}) {
    const Checkpoint ck = Checkpoint::open(kModels / m);
    ForwardOptions opt;
    opt.dtype = DType::F32;
    const std::vector<std::vector<int64_t>> seqs = {
        {5, 17, 300, 2, 9, 44, 1},
        {3, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 4, 6, 10, 16, 26, 42, 68, 110}};
    std::vector<float> emb;
    std::vector<int64_t> lengths;
    std::vector<std::vector<float>> alone_last;
    for (const auto& ids : seqs) {
      Capture cap;
      forward(ck, ids, opt, &cap);
      emb.insert(emb.end(), cap.hidden[0].begin(), cap.hidden[0].end());
      alone_last.push_back(cap.hidden.back());
      lengths.push_back(int64_t(ids.size()));
    }
    Capture batch;
    forward_batch(ck, emb, lengths, opt, &batch);
    const std::vector<float>& last = batch.hidden.back();
    const int64_t H = ck.config().hidden_size;
    size_t off = 0;
    for (size_t s = 0; s < seqs.size(); ++s) {
      const std::vector<float> part(last.begin() + long(off),
                                    last.begin() + long(off + seqs[s].size() * size_t(H)));
      const Cmp c = compare(part, alone_last[s]);
      EXPECT_EQ(c.pattern_mismatch, 0) << m;
      EXPECT_LE(c.rel, 1e-5) << m << " sequence " << s;
      off += seqs[s].size() * size_t(H);
    }
  }
}

}  // namespace
}  // namespace nanscope
