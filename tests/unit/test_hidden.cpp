// `nanscope hidden`: input lines, soft embeddings, pooling, the shard/index layout, resuming,
// bad input, and the states of discrete / soft / mixed inputs against transformers' goldens
// (tools/fixtures/make_hidden_goldens.py). A golden that is absent FAILS with the command that
// makes it.
// GCC 12 reports -Wrestrict on std::string assignment and operator+ inlined at -O2 (a known false
// positive, GCC bug 105651); it would stop a -Werror build for nothing.
#pragma GCC diagnostic ignored "-Wrestrict"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli_util.hpp"
#include "common/error.hpp"
#include "formats/checkpoint.hpp"
#include "formats/safetensors.hpp"
#include "model/adapter_overlay.hpp"
#include "model/forward.hpp"
#include "numerics/dtype.hpp"
#include "numerics/kernels.hpp"
#include "tools/hidden.hpp"
#include "tools/hidden_read.hpp"

namespace nanscope {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::fixture;
using testing::run_cli;
using testing::TempDir;

const fs::path kModels = fs::path(NANSCOPE_FIXTURES) / "models";
// NANSCOPE_HIDDEN_GOLDENS points elsewhere (goldens made on another machine, not committed).
const fs::path kGoldens = std::getenv("NANSCOPE_HIDDEN_GOLDENS")
                              ? fs::path(std::getenv("NANSCOPE_HIDDEN_GOLDENS"))
                              : fs::path(NANSCOPE_FIXTURES) / "goldens" / "hidden";
const char* kMakeGoldens =
    "python3 tools/fixtures/make_hidden_goldens.py --models tests/fixtures/models --out "
    "tests/fixtures/goldens/hidden";

void write_text(const fs::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary);
  f << s;
}

std::vector<float> read_tensor(const SafetensorsFile& f, const std::string& name) {
  const TensorInfo* t = f.find(name);
  if (!t) return {};
  std::vector<float> v(size_t(t->numel()));
  load_to_f32(f.data(*t).data(), t->dtype, v.data(), v.size());
  return v;
}

bool bit_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

HiddenInput ids_input(std::vector<int64_t> ids) {
  HiddenInput in;
  in.id = "x";
  in.ids = std::move(ids);
  return in;
}

// ---- soft embeddings and states ----------------------------------------------------------------

TEST(Hidden, OneHotSoftEqualsDiscreteExactlyInEveryDtype) {
  const Checkpoint ck = Checkpoint::open(kModels / "qwen3-tiny");
  const std::vector<int64_t> ids = {1, 15, 300, 7, 42};
  HiddenInput soft, mixed = ids_input(ids);
  soft.id = mixed.id = "s";
  for (size_t t = 0; t < ids.size(); ++t) soft.soft[int64_t(t)] = {{ids[t], 1.0f}};
  mixed.ids[2] = 0;  // replaced by the soft position: its id does not matter
  mixed.soft[2] = {{ids[2], 1.0f}};
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    ForwardOptions f;
    f.dtype = dt;
    const HiddenStates a = hidden_states(ck, ids_input(ids), f);
    const HiddenStates b = hidden_states(ck, soft, f);
    const HiddenStates c = hidden_states(ck, mixed, f);
    ASSERT_EQ(a.states.size(), size_t(ck.config().num_hidden_layers + 1));
    for (size_t k = 0; k < a.states.size(); ++k) {
      EXPECT_TRUE(bit_equal(a.states[k], b.states[k])) << "state " << k << " dtype " << int(dt);
      EXPECT_TRUE(bit_equal(a.states[k], c.states[k])) << "state " << k << " dtype " << int(dt);
    }
  }
}

TEST(Hidden, MixtureIsAnFp32SumOfRunDtypeRowsRoundedOnce) {
  const Checkpoint ck = Checkpoint::open(kModels / "llama-tiny");
  const int64_t H = ck.config().hidden_size;
  HiddenInput in;
  in.id = "m";
  in.soft[0] = {{3, 0.25f}, {700, 0.5f}, {9, 0.25f}};
  in.soft[1] = {{5, 0.6f}, {6, 0.4f}};
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    const std::vector<float> e = input_embeddings(ck, in, dt);
    const TensorRef w = ck.get("model.embed_tokens.weight");
    const WeightView wv{w.bytes().data(), w.info->dtype, ck.config().vocab_size, H};
    for (int64_t t = 0; t < 2; ++t)
      for (int64_t c = 0; c < H; ++c) {
        float acc = 0;
        for (const auto& [tok, p] : in.soft[t]) {
          volatile float prod = p * weight_at(wv, tok, c, dt);  // no FMA in the reference
          acc = acc + prod;
        }
        ASSERT_EQ(e[size_t(t * H + c)], round_to(acc, dt)) << "t " << t << " c " << c;
      }
  }
}

TEST(Hidden, LayersSubsetKeepsOnlyThoseAndStopsEarly) {
  const Checkpoint ck = Checkpoint::open(kModels / "qwen3-tiny");
  ForwardOptions f;
  const HiddenStates all = hidden_states(ck, ids_input({1, 2, 3}), f);
  const std::vector<int64_t> layers = {0, 2};
  const HiddenStates some = hidden_states(ck, ids_input({1, 2, 3}), f, layers);
  ASSERT_EQ(some.states.size(), all.states.size());
  EXPECT_TRUE(bit_equal(some.states[0], all.states[0]));
  EXPECT_TRUE(bit_equal(some.states[2], all.states[2]));
  EXPECT_TRUE(some.states[1].empty());
  EXPECT_TRUE(some.states[3].empty());
}

TEST(Hidden, PoolLastAndMean) {
  const std::vector<float> s = {1, 2, 3, 4, 5, 6};  // T=3, H=2
  EXPECT_EQ(pool_state(s, 3, 2, Pool::Last), (std::vector<float>{5, 6}));
  EXPECT_EQ(pool_state(s, 3, 2, Pool::Mean), (std::vector<float>{3, 4}));
  EXPECT_EQ(pool_state(s, 3, 2, Pool::None), s);
}

// hidden_states_pooled hands over each pool of each state asked for, input by input: pool_state
// of what hidden_states_batch hands over whole, and whether that whole state was finite.
TEST(Hidden, PooledBatchIsThePoolOfEachWholeState) {
  const Checkpoint ck = Checkpoint::open(kModels / "qwen3-tiny");
  ForwardOptions f;
  const HiddenInput a = ids_input({1, 2, 3}), b = ids_input({9, 8, 7, 6, 5});
  const std::vector<const HiddenInput*> batch = {&a, &b};
  const std::vector<int64_t> layers = {0, 2};
  std::map<std::pair<size_t, int64_t>, std::vector<float>> whole;
  hidden_states_batch(ck, batch, f, layers, [&](size_t i, int64_t k, std::span<const float> st) {
    whole[{i, k}].assign(st.begin(), st.end());
  });
  ASSERT_EQ(whole.size(), 4u);
  const Pool pools[] = {Pool::Last, Pool::Mean};
  int seen = 0;
  hidden_states_pooled(
      ck, batch, f, layers, pools,
      [&](size_t i, int64_t k, Pool p, std::span<const float> v, bool finite) {
        const std::vector<float>& st = whole.at({i, k});
        const int64_t T = batch[i]->tokens(), H = ck.config().hidden_size;
        EXPECT_TRUE(bit_equal(std::vector<float>(v.begin(), v.end()), pool_state(st, T, H, p)))
            << "input " << i << " state " << k;
        EXPECT_TRUE(finite);
        ++seen;
      });
  EXPECT_EQ(seen, 8);  // 2 inputs x 2 states x 2 pools
}

TEST(Hidden, ParseLayers) {
  EXPECT_EQ(parse_layers("all", 4), (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(parse_layers("3,0, 3,-1", 4), (std::vector<int64_t>{0, 3}));
  EXPECT_THROW(parse_layers("4", 4), InputError);
  EXPECT_THROW(parse_layers("1,x", 4), InputError);
}

// ---- input lines -------------------------------------------------------------------------------

TEST(Hidden, ParsesEveryInputShape) {
  auto parse = [](const std::string& line) {
    return parse_hidden_input(json::parse(line), {}, "f:1");
  };
  HiddenInput a = parse(R"({"id": 7, "ids": [1, 2, 3]})");
  EXPECT_EQ(a.id, "7");
  EXPECT_EQ(a.kind(), "ids");
  HiddenInput b = parse(R"({"id": "b", "soft": [[[1, 0.5], [2, 0.5]], [[3, 1.0]]]})");
  EXPECT_EQ(b.kind(), "soft");
  EXPECT_EQ(b.tokens(), 2);
  EXPECT_EQ(b.soft[0].size(), 2u);
  HiddenInput c = parse(R"({"id": "c", "ids": [1, 2, 3], "soft": {"1": [[5, 0.25], [6, 0.75]]}})");
  EXPECT_EQ(c.kind(), "mixed");
  EXPECT_EQ(c.tokens(), 3);
  EXPECT_EQ(c.soft.at(1)[1].second, 0.75f);
  EXPECT_THROW(parse(R"({"id": "t", "text": "hi"})"), InputError);  // no tokenizer
  EXPECT_THROW(parse(R"({"ids": [1]})"), InputError);
  EXPECT_THROW(parse(R"({"id": "c", "ids": [1], "soft": [[[5, 1.0]]]})"), InputError);
  EXPECT_THROW(parse(R"({"id": "c", "ids": [1], "soft": {"x": [[5, 1.0]]}})"), InputError);
  EXPECT_THROW(parse(R"({"id": "c", "ids": [1.5]})"), InputError);
}

TEST(Hidden, ValidationNamesWhatIsWrong) {
  InputRules r;
  r.vocab_size = 10;
  auto msg = [&](const std::string& line) -> std::string {
    try {
      validate_input(parse_hidden_input(json::parse(line), {}, "f:3"), r, "f:3");
    } catch (const InputError& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(msg(R"({"id": "a", "ids": [1, 10]})").find("token id 10"), std::string::npos);
  EXPECT_NE(msg(R"({"id": "a", "soft": [[[1, 0.5], [2, 0.4]]]})").find("sum to 0.9"),
            std::string::npos);
  EXPECT_NE(msg(R"({"id": "a", "soft": [[[1, -0.5], [2, 1.5]]]})").find("non-negative"),
            std::string::npos);
  EXPECT_NE(msg(R"({"id": "a", "ids": [1], "soft": {"3": [[1, 1.0]]}})").find("position 3"),
            std::string::npos);
  EXPECT_EQ(msg(R"({"id": "a", "soft": [[[1, 0.5], [2, 0.5004]]]})"), "");
  r.allow_unnormalized = true;
  EXPECT_EQ(msg(R"({"id": "a", "soft": [[[1, 0.5], [2, 0.4]]]})"), "");
}

// ---- the command: layout, resume, exit codes ----------------------------------------------------

TEST(CliHidden, WritesShardsAndIndexAndResumes) {
  TempDir d;
  const fs::path in = d.path / "in.jsonl", out = d.path / "out";
  write_text(in,
             "{\"id\": \"a\", \"ids\": [1, 2, 3, 4]}\n"
             "\n"
             "{\"id\": \"b\", \"soft\": [[[1, 0.5], [2, 0.5]], [[3, 1.0]]]}\n"
             "{\"id\": \"c\", \"ids\": [5, 6, 7], \"soft\": {\"2\": [[8, 0.9], [9, 0.1]]}}\n");
  const std::string model = fixture("models/qwen3-tiny");
  auto r = run_cli({"hidden", model, "--input", in.string(), "--out", out.string(), "--layers",
                    "0,-1", "--pool", "last", "--batch-tokens", "5", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(r.err.empty()) << "stderr is not a terminal: no progress bar; got " << r.err;
  const json j = r.json();
  EXPECT_EQ(j["written"], 3);
  EXPECT_EQ(j["tokens"], 9);
  EXPECT_EQ(j["shards"].size(), 2u);  // a (4 tokens: b would pass 5), then the batch b + c
  const json idx = json::parse(std::ifstream(out / "index.json"));
  EXPECT_EQ(idx["format"], "nanscope-hidden/1");
  EXPECT_EQ(idx["inputs"]["a"]["file"], "hidden-00001.safetensors");
  EXPECT_EQ(idx["inputs"]["b"]["file"], "hidden-00002.safetensors");
  EXPECT_EQ(idx["inputs"]["c"]["file"], "hidden-00002.safetensors");
  EXPECT_EQ(idx["inputs"]["c"]["kind"], "mixed");
  EXPECT_EQ(idx["settings"]["layers"], json::array({0, 3}));

  // The shard holds what the library computes.
  auto shard = SafetensorsFile::open(out / "hidden-00001.safetensors");
  EXPECT_EQ(shard->tensors().size(), 2u);
  const Checkpoint ck = Checkpoint::open(model);
  const HiddenStates hs = hidden_states(ck, ids_input({1, 2, 3, 4}), ForwardOptions{});
  EXPECT_TRUE(
      bit_equal(read_tensor(*shard, "a.layer3"), pool_state(hs.states[3], 4, 64, Pool::Last)));
  auto shard2 = SafetensorsFile::open(out / "hidden-00002.safetensors");
  EXPECT_EQ(shard2->find("b.layer0")->shape, (std::vector<int64_t>{64}));

  // Rerun with one more line: only the new one is computed, into a new shard.
  write_text(in,
             "{\"id\": \"a\", \"ids\": [1, 2, 3, 4]}\n"
             "{\"id\": \"b\", \"soft\": [[[1, 0.5], [2, 0.5]], [[3, 1.0]]]}\n"
             "{\"id\": \"c\", \"ids\": [5, 6, 7], \"soft\": {\"2\": [[8, 0.9], [9, 0.1]]}}\n"
             "{\"id\": \"d\", \"text\": \"x\"}\n");
  r = run_cli({"hidden", model, "--input", in.string(), "--out", out.string(), "--layers", "0,-1",
               "--pool", "last", "--json"});
  EXPECT_EQ(r.exit_code, 2) << "text without a tokenizer";
  EXPECT_NE(r.err.find("in.jsonl:4"), std::string::npos) << r.err;
  write_text(in, "{\"id\": \"a\", \"ids\": [1, 2, 3, 4]}\n{\"id\": \"d\", \"ids\": [9]}\n");
  r = run_cli({"hidden", model, "--input", in.string(), "--out", out.string(), "--layers", "0,-1",
               "--pool", "last", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.json()["written"], 1);
  EXPECT_EQ(r.json()["skipped"], 1);
  EXPECT_EQ(r.json()["shards"], json::array({"hidden-00003.safetensors"}));

  // Other settings into the same directory: refused.
  r = run_cli({"hidden", model, "--input", in.string(), "--out", out.string(), "--pool", "mean"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("pool"), std::string::npos) << r.err;

  // A damaged index is refused with its name, never a crash.
  write_text(out / "index.json", "{\"format\": \"nanscope-hidden/1\", \"inputs\": []}");
  r = run_cli({"hidden", model, "--input", in.string(), "--out", out.string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("index.json: not a nanscope hidden index"), std::string::npos) << r.err;
}

// Shards are written while the next batch computes. A shard that cannot be written stops the
// run with an error naming it, once the batch after it has computed; the index names only the
// shards in place, no temporary is left, and a rerun computes the rest. The states of every
// input, in the end, are those of a run that never failed.
TEST(HiddenRun, AShardThatCannotBeWrittenStopsTheRunWhichResumes) {
  TempDir d;
  const fs::path in = d.path / "in.jsonl", out = d.path / "out", ref = d.path / "ref";
  std::string lines;
  for (int i = 0; i < 5; ++i)
    lines += fmt::format("{{\"id\": \"p{}\", \"ids\": [{}, {}, {}]}}\n", i, i + 1, i + 2, i + 3);
  write_text(in, lines);
  HiddenRunOptions o;
  o.model = fixture("models/qwen3-tiny");
  o.input = in;
  o.out = ref;
  o.batch_tokens = 3;  // one input per batch, one shard each
  const HiddenRunSummary whole = run_hidden(o);
  ASSERT_EQ(whole.shards.size(), 5u);

  o.out = out;
  // After the first shard, the second's name is taken by a directory: its rename fails.
  o.on_shard = [&](const HiddenRunSummary& s, int64_t) {
    if (s.shards.size() == 1) fs::create_directories(out / "hidden-00002.safetensors" / "x");
  };
  try {
    run_hidden(o);
    ADD_FAILURE() << "the run went on past a shard it could not write";
  } catch (const OutputError& e) {
    EXPECT_NE(std::string(e.what()).find("hidden-00002.safetensors"), std::string::npos)
        << e.what();
  }
  json idx = json::parse(std::ifstream(out / "index.json"));
  EXPECT_EQ(idx["shards"], json::array({"hidden-00001.safetensors"}));
  EXPECT_EQ(idx["inputs"].size(), 1u);
  for (const auto& e : fs::directory_iterator(out)) {
    const std::string n = e.path().filename().string();
    EXPECT_TRUE(n == "index.json" || n.starts_with("hidden-0000")) << "left behind: " << n;
    EXPECT_EQ(n.find(".tmp"), std::string::npos) << "left behind: " << n;
  }

  fs::remove_all(out / "hidden-00002.safetensors");
  o.on_shard = nullptr;
  const HiddenRunSummary rest = run_hidden(o);
  EXPECT_EQ(rest.skipped, 1);
  EXPECT_EQ(rest.written, 4);
  idx = json::parse(std::ifstream(out / "index.json"));
  const json ridx = json::parse(std::ifstream(ref / "index.json"));
  ASSERT_EQ(idx["inputs"].size(), 5u);
  for (const auto& [id, entry] : ridx["inputs"].items()) {
    auto a = SafetensorsFile::open(ref / entry["file"].get<std::string>());
    auto b = SafetensorsFile::open(out / idx["inputs"][id]["file"].get<std::string>());
    for (int k = 0; k < 4; ++k) {
      const std::string name = id + ".layer" + std::to_string(k);
      EXPECT_TRUE(bit_equal(read_tensor(*a, name), read_tensor(*b, name))) << name;
    }
  }
}

// --shard K/N: the slices together are the unsharded run, bit for bit, in input order. Every
// input is a batch alone (--batch-tokens 1) in both runs: a batch of other rows may round the
// products' sums in another order (docs/hidden.md), which is not what this test is about.
TEST(CliHidden, ShardsTogetherAreTheUnshardedRun) {
  TempDir d;
  const fs::path in = d.path / "in.jsonl", full = d.path / "full", sliced = d.path / "sliced";
  std::string lines;
  std::vector<std::string> ids;
  for (int i = 0; i < 8; ++i) {
    const std::string id = "p" + std::to_string(7 - i);  // ids not in sorted order
    ids.push_back(id);
    if (i == 4)
      lines += "{\"id\": \"" + id + "\", \"soft\": [[[1, 0.5], [2, 0.5]], [[3, 1.0]]]}\n\n";
    else
      lines += "{\"id\": \"" + id + "\", \"ids\": [" + std::to_string(10 + i) + ", " +
               std::to_string(20 + 3 * i) + ", 5]}\n";
  }
  write_text(in, lines);
  const std::string model = fixture("models/qwen3-tiny");
  const std::vector<std::string> common = {"hidden",         model,      "--input",
                                           in.string(),      "--layers", "0,2,-1",
                                           "--batch-tokens", "1",        "--json"};
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> a = common;
    a.insert(a.end(), extra.begin(), extra.end());
    return run_cli(a);
  };
  auto r = with({"--out", full.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // Slices started in any order, each into its own directory under --out.
  for (const char* k : {"2/3", "0/3"}) {
    r = with({"--out", sliced.string(), "--shard", k});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  const json s2 = json::parse(std::ifstream(sliced / "slice-00002-of-00003" / "index.json"));
  EXPECT_EQ(s2["settings"]["slice"], json({{"index", 2}, {"count", 3}}));
  EXPECT_EQ(s2["inputs"].size(), 2u);  // inputs 2 and 5 of 8
  EXPECT_EQ(s2["inputs"][ids[5]]["input_index"], 5);
  EXPECT_TRUE(s2["inputs"].contains(ids[2]));

  // Two of three: merged, but incomplete (exit 1, the missing slice named).
  r = run_cli({"hidden", "--merge-index", sliced.string(), "--json"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_EQ(r.json()["missing_slices"], json::array({1}));
  EXPECT_EQ(r.json()["inputs"], 5);  // 0, 3, 6 and 2, 5

  r = with({"--out", sliced.string(), "--shard", "1/3"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.json()["inputs"], 3);  // 1, 4, 7
  EXPECT_EQ(r.json()["written"], 3);
  // A slice resumes like any run: nothing left to do.
  r = with({"--out", sliced.string(), "--shard", "1/3"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.json()["written"], 0);
  EXPECT_EQ(r.json()["skipped"], 3);

  r = run_cli({"hidden", "--merge-index", sliced.string(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.json()["missing_slices"], json::array());
  const json merged = json::parse(std::ifstream(sliced / "index.json"));
  EXPECT_EQ(merged["order"], json(ids));
  EXPECT_EQ(merged["settings"]["layers"], json::array({0, 2, 3}));
  EXPECT_FALSE(merged["settings"].contains("slice"));

  // Every tensor of every input, found through the merged index, equals the unsharded run's.
  const json fidx = json::parse(std::ifstream(full / "index.json"));
  ASSERT_EQ(fidx["inputs"].size(), ids.size());
  size_t compared = 0;
  for (const std::string& id : ids) {
    auto ours = SafetensorsFile::open(sliced / merged["inputs"][id]["file"].get<std::string>());
    auto ref = SafetensorsFile::open(full / fidx["inputs"][id]["file"].get<std::string>());
    for (int k : {0, 2, 3}) {
      const std::string name = id + ".layer" + std::to_string(k);
      const auto a = read_tensor(*ours, name), b = read_tensor(*ref, name);
      ASSERT_FALSE(b.empty()) << name;
      EXPECT_TRUE(bit_equal(a, b)) << name;
      ++compared;
    }
  }
  EXPECT_EQ(compared, 24u);

  // The library's reader: the same, in input order, from the parent or from the slices listed.
  const std::vector<fs::path> parent = {sliced};
  const HiddenSet set = HiddenSet::open(parent);
  ASSERT_EQ(set.entries().size(), ids.size());
  const std::vector<fs::path> one = {full};
  const HiddenSet ref = HiddenSet::open(one);
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_EQ(set.entries()[i].id, ids[i]);
    EXPECT_EQ(ref.entries()[i].id, ids[i]);
    EXPECT_TRUE(bit_equal(set.read(set.entries()[i], -1), ref.read(ref.entries()[i], 3)));
  }
  const std::vector<fs::path> listed = {sliced / "slice-00001-of-00003",
                                        sliced / "slice-00000-of-00003"};
  EXPECT_EQ(HiddenSet::open(listed).entries().front().id, ids[0]);
  EXPECT_THROW(set.read(set.entries()[0], 1), InputError);  // state 1 was not kept

  // A merged index elsewhere names the slices' files relative to itself.
  r = run_cli({"hidden", "--merge-index", (sliced / "slice-00000-of-00003").string(),
               (sliced / "slice-00001-of-00003").string(), "--out", (d.path / "m").string()});
  EXPECT_EQ(r.exit_code, 1) << r.err;  // slice 2 missing
  const json m = json::parse(std::ifstream(d.path / "m" / "index.json"));
  EXPECT_EQ(m["inputs"][ids[1]]["file"], "../sliced/slice-00001-of-00003/hidden-00001.safetensors");
  const std::vector<fs::path> mdir = {d.path / "m"};
  EXPECT_EQ(HiddenSet::open(mdir).entries().size(), 6u);  // slices 0 and 1: 3 + 3
}

// Indexes written before input_index existed: their inputs come shard by shard.
TEST(CliHidden, IndexWithoutInputIndexReadsShardByShard) {
  TempDir d;
  const fs::path in = d.path / "in.jsonl", out = d.path / "out";
  write_text(in,
             "{\"id\": \"z\", \"ids\": [1, 2]}\n{\"id\": \"b\", \"ids\": [3]}\n"
             "{\"id\": \"m\", \"ids\": [4, 5, 6]}\n");
  auto r = run_cli({"hidden", fixture("models/qwen3-tiny"), "--input", in.string(), "--out",
                    out.string(), "--batch-tokens", "1", "--layers", "-1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json idx = json::parse(std::ifstream(out / "index.json"));
  for (auto& [id, v] : idx["inputs"].items()) v.erase("input_index");
  write_text(out / "index.json", idx.dump());
  const std::vector<fs::path> dirs = {out};
  const HiddenSet set = HiddenSet::open(dirs);
  ASSERT_EQ(set.entries().size(), 3u);
  EXPECT_EQ(set.entries()[0].id, "z");
  EXPECT_EQ(set.entries()[1].id, "b");
  EXPECT_EQ(set.entries()[2].id, "m");
  EXPECT_EQ(set.entries()[2].input_index, -1);
  EXPECT_EQ(set.read(set.entries()[2], -1).size(), 3u * 64u);
}

TEST(CliHidden, ShardsRefuseWhatCannotBeOneRun) {
  TempDir d;
  const fs::path in = d.path / "in.jsonl", out = d.path / "out";
  write_text(in, "{\"id\": \"a\", \"ids\": [1, 2]}\n{\"id\": \"b\", \"ids\": [3]}\n");
  const std::string model = fixture("models/qwen3-tiny");
  for (const char* bad : {"3/3", "-1/3", "1/0", "1", "a/b", "1/3x", " 1/3"}) {
    auto r =
        run_cli({"hidden", model, "--input", in.string(), "--out", out.string(), "--shard", bad});
    EXPECT_EQ(r.exit_code, 2) << bad;
    EXPECT_NE(r.err.find("--shard"), std::string::npos) << bad << ": " << r.err;
  }
  EXPECT_FALSE(fs::exists(out)) << "a bad --shard writes nothing";
  auto r = run_cli({"hidden", model, "--input", in.string(), "--out", out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // Slices into the directory of an unsharded run, and the two read as one: refused.
  r = run_cli({"hidden", model, "--input", in.string(), "--out", out.string(), "--shard", "0/2"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("unsharded"), std::string::npos) << r.err;
  const fs::path sl = d.path / "sl";
  r = run_cli({"hidden", model, "--input", in.string(), "--out", sl.string(), "--shard", "0/2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = run_cli(
      {"hidden", "--merge-index", out.string(), sl.string(), "--out", (d.path / "m").string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("input a is in both"), std::string::npos) << r.err;
  // Slices of another N, other settings, several directories without --out, a merged index
  // run into, a run index overwritten by a merged one: refused.
  r = run_cli({"hidden", model, "--input", in.string(), "--out", sl.string(), "--shard", "1/3"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = run_cli({"hidden", "--merge-index", sl.string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("not slices of one run"), std::string::npos) << r.err;
  const fs::path other = d.path / "other";
  r = run_cli({"hidden", model, "--input", in.string(), "--out", other.string(), "--shard", "1/2",
               "--dtype", "fp32"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = run_cli({"hidden", "--merge-index", (sl / "slice-00000-of-00002").string(),
               (other / "slice-00001-of-00002").string(), "--out", (d.path / "m").string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("other settings: dtype"), std::string::npos) << r.err;
  r = run_cli({"hidden", "--merge-index", sl.string(), other.string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--out"), std::string::npos) << r.err;
  r = run_cli({"hidden", "--merge-index", other.string()});
  ASSERT_EQ(r.exit_code, 1) << r.err;  // slice 0 of 2 missing
  r = run_cli({"hidden", model, "--input", in.string(), "--out", other.string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("merged index"), std::string::npos) << r.err;
  r = run_cli({"hidden", "--merge-index", other.string(), "--out", out.string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("not a merged one"), std::string::npos) << r.err;
  r = run_cli({"hidden", "--merge-index", out.string(), "--input", in.string()});
  EXPECT_EQ(r.exit_code, 2);
  r = run_cli({"hidden", model, "--input", in.string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--out are required"), std::string::npos) << r.err;
  r = run_cli({"hidden", "--merge-index", (d.path / "nowhere").string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("does not exist"), std::string::npos) << r.err;
}

TEST(CliHidden, OutDtypeRunStoresTheRunDtype) {
  TempDir d;
  const fs::path in = d.path / "in.jsonl", out = d.path / "out";
  write_text(in, "{\"id\": \"a\", \"ids\": [1, 2, 3]}\n");
  auto r = run_cli({"hidden", fixture("models/qwen3-tiny"), "--input", in.string(), "--out",
                    out.string(), "--out-dtype", "run", "--dtype", "fp16"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto shard = SafetensorsFile::open(out / "hidden-00001.safetensors");
  EXPECT_EQ(shard->find("a.layer0")->dtype, DType::F16);
  EXPECT_EQ(shard->find("a.layer0")->shape, (std::vector<int64_t>{3, 64}));
}

TEST(CliHidden, NonfiniteStatesAreListedAndExitOne) {
  TempDir d;
  const fs::path in = d.path / "in.jsonl", out = d.path / "out";
  write_text(in, "{\"id\": \"a\", \"ids\": [1, 2, 3]}\n");
  auto r = run_cli({"hidden", fixture("models/qwen3-nan"), "--input", in.string(), "--out",
                    out.string(), "--json"});
  ASSERT_EQ(r.exit_code, 1) << r.err;
  const json j = r.json();
  ASSERT_EQ(j["nonfinite"].size(), 1u);
  EXPECT_EQ(j["nonfinite"][0]["id"], "a");
  EXPECT_FALSE(j["nonfinite"][0]["layers"].empty());
  const json idx = json::parse(std::ifstream(out / "index.json"));
  EXPECT_EQ(idx["inputs"]["a"]["finite"], false);
  EXPECT_EQ(idx["nonfinite"]["a"], j["nonfinite"][0]["layers"]);
  // A rerun computes nothing and still reports it.
  r = run_cli({"hidden", fixture("models/qwen3-nan"), "--input", in.string(), "--out", out.string(),
               "--json"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.json()["written"], 0);
}

TEST(CliHidden, BadInputExitsTwoNamingFileAndLine) {
  TempDir d;
  const fs::path in = d.path / "in.jsonl";
  const std::string model = fixture("models/qwen3-tiny");
  struct Case {
    std::string text, expect;
  };
  const std::vector<Case> cases = {
      {"{\"id\": \"a\", \"ids\": [1]}\n{\"id\": \"b\", \"ids\": [1,\n", "in.jsonl:2: invalid JSON"},
      {"{\"id\": \"a\", \"ids\": [1, 99999]}\n", "token id 99999"},
      {"{\"id\": \"a\", \"soft\": [[[1, 0.2], [2, 0.2]]]}\n", "sum to 0.4"},
      {"{\"id\": \"a\", \"ids\": [1]}\n{\"id\": \"a\", \"ids\": [2]}\n", "already given on line 1"},
      {"{\"id\": \"a\", \"text\": \"hello\"}\n", "tokenizer"},
  };
  for (const auto& c : cases) {
    write_text(in, c.text);
    auto r = run_cli({"hidden", model, "--input", in.string(), "--out", (d.path / "out").string()});
    EXPECT_EQ(r.exit_code, 2) << c.text;
    EXPECT_NE(r.err.find(c.expect), std::string::npos) << c.text << " -> " << r.err;
    EXPECT_FALSE(fs::exists(d.path / "out" / "hidden-00001.safetensors")) << c.text;
  }
  write_text(in, "{\"id\": \"a\", \"soft\": [[[1, 0.2], [2, 0.2]]]}\n");
  auto r = run_cli({"hidden", model, "--input", in.string(), "--out", (d.path / "o2").string(),
                    "--allow-unnormalized"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  r = run_cli({"hidden", model, "--input", (d.path / "nope.jsonl").string(), "--out",
               (d.path / "o3").string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("nope.jsonl"), std::string::npos) << r.err;
}

TEST(CliHidden, TextInputsUseTheModelTokenizer) {
  TempDir d;
  const fs::path in = d.path / "in.jsonl", out = d.path / "out";
  write_text(in, "{\"id\": \"t\", \"text\": \"Hello, world!\"}\n");
  auto r = run_cli({"hidden", fixture("models/qwen3-example"), "--input", in.string(), "--out",
                    out.string(), "--json"});
  ASSERT_LE(r.exit_code, 1) << r.err;
  const json idx = json::parse(std::ifstream(out / "index.json"));
  EXPECT_EQ(idx["inputs"]["t"]["tokens"], 4);  // Hello , world !
}

// ---- against transformers ---------------------------------------------------------------------

struct GoldenCase {
  std::string model, dtype, input;
  std::string name() const { return model + "__" + dtype + "__" + input; }
};

void PrintTo(const GoldenCase& c, std::ostream* os) {
  *os << c.name();
}

std::vector<GoldenCase> golden_cases() {
  std::vector<GoldenCase> v;
  for (const char* m : {"qwen3-tiny", "llama-tiny"})
    for (const char* d : {"float32", "bfloat16"})
      for (const char* i : {"ids", "soft", "mixed"}) v.push_back({m, d, i});
  return v;
}

class HiddenGolden : public ::testing::TestWithParam<GoldenCase> {};

// fp32: 1e-5 relative norm error per state (the trace tolerance); bf16: the rounding-noise
// floor of the trace goldens, 1e-4, with the bit-identical fraction printed.
TEST_P(HiddenGolden, StatesAndPoolsMatchTransformers) {
  const GoldenCase& c = GetParam();
  const fs::path gp = kGoldens / (c.name() + ".safetensors");
  const fs::path jp = kGoldens / (c.model + "__inputs.jsonl");
  ASSERT_TRUE(fs::exists(gp) && fs::exists(jp)) << "golden " << gp << " (or " << jp.filename()
                                                << ") is missing; make it with: " << kMakeGoldens;
  auto g = SafetensorsFile::open(gp);
  const Checkpoint ck = Checkpoint::open(kModels / c.model);
  InputRules rules;
  rules.vocab_size = ck.config().vocab_size;
  const std::vector<HiddenInput> inputs = read_hidden_inputs(jp, {}, rules);
  const HiddenInput* in = nullptr;
  for (const auto& x : inputs)
    if (x.id == c.input) in = &x;
  ASSERT_NE(in, nullptr) << c.input << " not in " << jp;
  ForwardOptions f;
  f.dtype = c.dtype == "float32" ? DType::F32 : DType::BF16;
  const double tol = f.dtype == DType::F32 ? 1e-5 : 1e-4;

  if (in->has_soft()) {  // the embedding step is elementwise: identical, bit for bit
    const std::vector<float> gold = read_tensor(*g, "inputs_embeds");
    const std::vector<float> e = input_embeddings(ck, *in, f.dtype);
    int64_t diff = 0;
    for (size_t i = 0; i < gold.size() && i < e.size(); ++i)
      diff += std::memcmp(&gold[i], &e[i], 4) != 0;
    EXPECT_EQ(gold.size(), e.size());
    EXPECT_EQ(diff, 0) << "inputs_embeds differ from torch's in " << diff << " elements";
  }

  const HiddenStates hs = hidden_states(ck, *in, f);
  int64_t total = 0, identical = 0;
  double worst = 0;
  for (size_t k = 0; k < hs.states.size(); ++k) {
    for (const char* what : {"hidden", "last", "mean"}) {
      const std::string key = std::string(what) + "." + std::to_string(k);
      const std::vector<float> gold = read_tensor(*g, key);
      ASSERT_FALSE(gold.empty()) << key << " missing from " << gp;
      const Pool p = what[0] == 'h' ? Pool::None : what[0] == 'l' ? Pool::Last : Pool::Mean;
      const std::vector<float> ours = pool_state(hs.states[k], hs.T, hs.H, p);
      ASSERT_EQ(ours.size(), gold.size()) << key;
      double num = 0, den = 0;
      for (size_t i = 0; i < gold.size(); ++i) {
        ASSERT_TRUE(std::isfinite(ours[i]) && std::isfinite(gold[i])) << key << "[" << i << "]";
        num += (double(ours[i]) - gold[i]) * (double(ours[i]) - gold[i]);
        den += double(gold[i]) * gold[i];
        identical += std::memcmp(&ours[i], &gold[i], 4) == 0;
      }
      total += int64_t(gold.size());
      const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
      EXPECT_LE(rel, tol) << key << ": relative error " << rel;
      worst = std::max(worst, rel);
    }
  }
  const double frac = double(identical) / double(total);
  std::printf("[ golden   ] %-36s max rel err %.2e, bit-identical %.4f%%\n", c.name().c_str(),
              worst, 100.0 * frac);
  RecordProperty("bit_identical_fraction", std::to_string(frac));
  RecordProperty("max_rel_err", std::to_string(worst));
}

INSTANTIATE_TEST_SUITE_P(Goldens, HiddenGolden, ::testing::ValuesIn(golden_cases()),
                         [](const auto& p) {
                           std::string n = p.param.name();
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

// The command end to end on the goldens' input file: its shards hold the goldens' pooled states.
TEST(HiddenGoldenCli, ShardsOfTheGoldenInputsMatch) {
  const fs::path jp = kGoldens / "qwen3-tiny__inputs.jsonl";
  ASSERT_TRUE(fs::exists(jp)) << jp << " is missing; make it with: " << kMakeGoldens;
  TempDir d;
  auto r = run_cli({"hidden", fixture("models/qwen3-tiny"), "--input", jp.string(), "--out",
                    d.path.string(), "--dtype", "fp32", "--pool", "mean", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json idx = json::parse(std::ifstream(d.path / "index.json"));
  for (const char* id : {"ids", "soft", "mixed"}) {
    auto g = SafetensorsFile::open(kGoldens /
                                   (std::string("qwen3-tiny__float32__") + id + ".safetensors"));
    auto s = SafetensorsFile::open(d.path / idx["inputs"][id]["file"].get<std::string>());
    for (int k = 0; k <= 3; ++k) {
      const auto ours = read_tensor(*s, std::string(id) + ".layer" + std::to_string(k));
      const auto gold = read_tensor(*g, "mean." + std::to_string(k));
      ASSERT_EQ(ours.size(), gold.size()) << id << " " << k;
      double num = 0, den = 0;
      for (size_t i = 0; i < gold.size(); ++i) {
        num += (double(ours[i]) - gold[i]) * (double(ours[i]) - gold[i]);
        den += double(gold[i]) * gold[i];
      }
      EXPECT_LE(std::sqrt(num / den), 1e-5) << id << " layer " << k;
    }
  }
}

// The batched forward against transformers: sequences of 9..64 tokens (ids and one soft input)
// through one pass (256 rows) and through several batches; every state of every input must
// match the golden computed alone. On a processor where oneDNN has a bf16 kernel (AMX,
// AVX512-BF16) the bf16 cases run it; elsewhere the OpenBLAS path.
//
// Tolerances: fp32 1e-5 relative (the trace tolerance). bf16: at these lengths the fp32 sums
// inside a product or a norm end near a bf16 rounding tie often enough that a different
// summation order (OpenBLAS vs torch's oneDNN; AVX2 vs AVX-512 lanes in RMSNorm) flips some
// elements by one bf16 ulp, and later layers carry the flip on. Measured: 0 (AMX, qwen3),
// 1.1e-3 (both paths, llama: the final norm) and 3.2e-3 (OpenBLAS, qwen3, state 3) relative,
// 97.8-100 % of elements bit-identical. The bound is one bf16 ulp relative (2^-8 = 3.9e-3) with
// at least 95 % identical: a real fault (a position not restarting, attention crossing two
// sequences) gives errors of order 1.
struct BatchCase {
  std::string model, dtype;
  int64_t batch_tokens;
};

void PrintTo(const BatchCase& c, std::ostream* os) {
  *os << c.model << "__" << c.dtype << "__" << c.batch_tokens;
}

class HiddenGoldenBatch : public ::testing::TestWithParam<BatchCase> {};

TEST_P(HiddenGoldenBatch, EverySequenceMatchesTransformersAlone) {
  const BatchCase& c = GetParam();
  const fs::path jp = kGoldens / (c.model + "__batch.jsonl");
  ASSERT_TRUE(fs::exists(jp)) << jp << " is missing; make it with: " << kMakeGoldens;
  TempDir d;
  HiddenRunOptions o;
  o.model = kModels / c.model;
  o.input = jp;
  o.out = d.path / "out";
  o.fwd.dtype = c.dtype == "float32" ? DType::F32 : DType::BF16;
  o.batch_tokens = c.batch_tokens;
  const HiddenRunSummary r = run_hidden(o);
  EXPECT_TRUE(r.nonfinite.empty());
  EXPECT_EQ(r.shards.size(), c.batch_tokens >= 256 ? 1u : 5u);
  const double tol = o.fwd.dtype == DType::F32 ? 1e-5 : 1.0 / 256;
  const json idx = json::parse(std::ifstream(o.out / "index.json"));
  ASSERT_EQ(idx["inputs"].size(), 7u);
  int64_t total = 0, identical = 0;
  double worst = 0;
  for (const auto& [id, entry] : idx["inputs"].items()) {
    auto s = SafetensorsFile::open(o.out / entry["file"].get<std::string>());
    const fs::path gp = kGoldens / (c.model + "__" + c.dtype + "__batch__" + id + ".safetensors");
    ASSERT_TRUE(fs::exists(gp)) << gp << " is missing; make it with: " << kMakeGoldens;
    auto g = SafetensorsFile::open(gp);
    for (int k = 0;; ++k) {
      const auto gold = read_tensor(*g, "hidden." + std::to_string(k));
      if (gold.empty()) {
        EXPECT_GT(k, 2) << gp;
        break;
      }
      const auto ours = read_tensor(*s, id + ".layer" + std::to_string(k));
      ASSERT_EQ(ours.size(), gold.size()) << id << " state " << k;
      double num = 0, den = 0;
      for (size_t i = 0; i < gold.size(); ++i) {
        num += (double(ours[i]) - gold[i]) * (double(ours[i]) - gold[i]);
        den += double(gold[i]) * gold[i];
        identical += std::memcmp(&ours[i], &gold[i], 4) == 0;
      }
      total += int64_t(gold.size());
      const double rel = std::sqrt(num / den);
      EXPECT_LE(rel, tol) << id << " state " << k;
      worst = std::max(worst, rel);
    }
  }
  const double frac = double(identical) / double(total);
  if (o.fwd.dtype == DType::BF16) {
    EXPECT_GE(frac, 0.95);
  }
  std::printf(
      "[ golden   ] batch %s %s batch-tokens %lld: max rel err %.2e, bit-identical %.4f%%\n",
      c.model.c_str(), c.dtype.c_str(), static_cast<long long>(c.batch_tokens), worst,
      100.0 * frac);
}

INSTANTIATE_TEST_SUITE_P(Goldens, HiddenGoldenBatch,
                         ::testing::Values(BatchCase{"qwen3-tiny", "float32", 4096},
                                           BatchCase{"qwen3-tiny", "bfloat16", 4096},
                                           BatchCase{"qwen3-tiny", "bfloat16", 70},
                                           BatchCase{"llama-tiny", "float32", 70},
                                           BatchCase{"llama-tiny", "bfloat16", 4096}),
                         [](const auto& p) {
                           std::string n = p.param.model + "_" + p.param.dtype + "_" +
                                           std::to_string(p.param.batch_tokens);
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

// The batched path (the hidden command) embeds token ids as forward() does: with an adapter, its
// embedding LoRA, trainable tokens and saved lm_head/embedding apply there too (they were left
// out: the states of `hidden --adapter` differed from trace's from state 0 on).
TEST(HiddenBatch, AnAdaptersEmbeddingChangesApplyAsInForward) {
  for (const char* adapter : {"embed-lmhead-untied", "trainable-tokens", "embed-modules-to-save"}) {
    const Checkpoint ck = Checkpoint::open(fixture("models/llama-tiny"));
    const auto ov = AdapterOverlay::open(fixture(std::string("adapters/") + adapter), ck);
    ForwardOptions f;
    f.dtype = DType::BF16;
    f.adapter = ov.get();
    HiddenInput in;
    in.ids = {1, 15, 300, 7, 42, 999, 3, 12};
    const HiddenStates alone = hidden_states(ck, in, f);
    ForwardOptions bare = f;
    bare.adapter = nullptr;
    const HiddenStates base = hidden_states(ck, in, bare);
    const HiddenInput* batch[] = {&in};
    std::vector<std::vector<float>> got(alone.states.size());
    hidden_states_batch(ck, batch, f, {}, [&](size_t, int64_t k, std::span<const float> st) {
      got[size_t(k)].assign(st.begin(), st.end());
    });
    for (size_t k = 0; k < got.size(); ++k)
      EXPECT_EQ(got[k], alone.states[k]) << adapter << " state " << k;
    EXPECT_NE(alone.states[0], base.states[0]) << adapter << ": the adapter left state 0 as it was";
  }
}

// forward_batch_ids (hidden's batches of ids on a GPU that gathers the rows) elsewhere embeds the
// ids as forward() does: the pass of forward_batch over embed_ids' rows, bit for bit, with an
// adapter's embedding changes too; an id outside the vocabulary or a count that does not match
// the lengths is an input error naming it.
TEST(HiddenBatch, IdsGiveTheEmbeddingsPass) {
  const Checkpoint ck = Checkpoint::open(fixture("models/llama-tiny"));
  const auto ov = AdapterOverlay::open(fixture("adapters/embed-lmhead-untied"), ck);
  for (const AdapterOverlay* a : {static_cast<const AdapterOverlay*>(nullptr), ov.get()}) {
    ForwardOptions f;
    f.dtype = DType::BF16;
    f.adapter = a;
    const std::vector<int64_t> ids = {1, 15, 300, 7, 42, 999, 3, 12, 5, 600, 2};
    const std::vector<int64_t> lengths = {8, 3};
    const ForwardResult by_ids = forward_batch_ids(ck, ids, lengths, f);
    const ForwardResult by_rows = forward_batch(ck, embed_ids(ck, ids, f), lengths, f);
    ASSERT_FALSE(by_ids.logits.empty());
    EXPECT_EQ(by_ids.logits, by_rows.logits) << (a ? "adapter" : "bare");
  }
  ForwardOptions f;
  const std::vector<int64_t> bad = {1, 2, 1024}, lengths = {3}, two = {2};
  try {
    forward_batch_ids(ck, bad, lengths, f);
    ADD_FAILURE() << "an id past the vocabulary ran";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("token id 1024"), std::string::npos) << e.what();
  }
  try {
    forward_batch_ids(ck, bad, two, f);
    ADD_FAILURE() << "3 ids for 2 tokens ran";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("3 token ids"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace nanscope
