// The command line as a new user meets it: a command line that explains itself (the list of
// commands, "did you mean", --version, --help with examples, defaults and exit codes), hub ids
// from the local cache, messages for paths that are not there or not what they are passed as,
// strict lists and dtype spellings, JSON documents for failures, check's default prompt, and
// merge's fixes and fidelity in words.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

#include "cli_util.hpp"
#include "fake_hub.hpp"
#include "numerics/dtype.hpp"
#include "synthetic_model.hpp"

using namespace nanscope;
using namespace nanscope::testing;
using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;

namespace {

const std::vector<std::string> kNoHubEnv = {"-u HF_HUB_CACHE", "-u HUGGINGFACE_HUB_CACHE",
                                            "-u HF_HOME", "-u XDG_CACHE_HOME"};

std::vector<std::string> hub_env(const fs::path& cache) {
  auto env = kNoHubEnv;
  env.push_back("HF_HUB_CACHE=" + cache.string());
  return env;
}

// Copies a fixture directory and applies `edit` to its config.json.
fs::path copy_with_config(const fs::path& to, const std::string& from,
                          const std::function<void(nlohmann::json&)>& edit) {
  fs::copy(fixture(from), to, fs::copy_options::recursive);
  nlohmann::json c = nlohmann::json::parse(std::ifstream(to / "config.json"));
  edit(c);
  std::ofstream(to / "config.json") << c.dump(2);
  return to;
}

// The --json failure document: {"error": {"kind", "file", "message"}}.
void expect_error_json(const CliResult& r, const std::string& kind) {
  EXPECT_EQ(r.exit_code, 2) << r.err;
  nlohmann::json j;
  ASSERT_NO_THROW(j = r.json()) << "stdout: " << r.out;
  ASSERT_TRUE(j.contains("error")) << r.out;
  EXPECT_EQ(j["error"]["kind"], kind) << r.out;
  EXPECT_TRUE(j["error"].contains("file")) << r.out;
  EXPECT_FALSE(j["error"]["message"].get<std::string>().empty());
}

}  // namespace

TEST(CliUsage, AloneItListsTheCommands) {
  auto r = run_cli({});
  EXPECT_EQ(r.exit_code, 2);
  for (const char* c : {"scan", "trace", "tokenize", "merge", "check", "hidden"})
    EXPECT_THAT(r.err, HasSubstr(std::string("\n  ") + c + " ")) << r.err;
  EXPECT_THAT(r.err, HasSubstr("Exit codes"));
  EXPECT_THAT(r.err, HasSubstr("hub id"));
}

TEST(CliUsage, AnUnknownCommandGetsAGuess) {
  auto r = run_cli({"chek", "x"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("unknown command \"chek\"; did you mean \"check\"?"));
  EXPECT_THAT(r.err, HasSubstr("  merge "));  // and the list
  EXPECT_THAT(run_cli({"tokenise"}).err, HasSubstr("did you mean \"tokenize\""));
  EXPECT_THAT(run_cli({"hiden"}).err, HasSubstr("did you mean \"hidden\""));
  EXPECT_THAT(run_cli({"frobnicate"}).err, Not(HasSubstr("did you mean")));
  // An unknown flag of a command: the closest flag.
  auto f = run_cli({"trace", fixture("models/qwen3-tiny"), "--ids", "1", "--dtyp", "bf16"});
  EXPECT_EQ(f.exit_code, 2);
  EXPECT_THAT(f.err, HasSubstr("did you mean --dtype?"));
  expect_error_json(run_cli({"frobnicate", "--json"}), "usage");
}

TEST(CliUsage, VersionEverywhere) {
  auto r = run_cli({"--version"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, HasSubstr("nanscope 0."));
  for (const char* c : {"scan", "trace", "tokenize", "merge", "check", "hidden"}) {
    auto s = run_cli({c, "--version"});
    EXPECT_EQ(s.exit_code, 0) << c << ": " << s.err;
    EXPECT_EQ(s.out, r.out) << c;
  }
}

TEST(CliUsage, HelpShowsExamplesDefaultsExitCodesAndPathTypes) {
  for (const char* c : {"scan", "trace", "tokenize", "merge", "check", "hidden"}) {
    auto h = run_cli({c, "--help"});
    EXPECT_EQ(h.exit_code, 0) << c;
    EXPECT_THAT(h.out, HasSubstr("Examples:\n  nanscope ")) << c;
    EXPECT_THAT(h.out, HasSubstr("Exit codes: 0 ")) << c;
    EXPECT_THAT(h.out, HasSubstr("2 unusable input")) << c;
    EXPECT_THAT(h.out, Not(HasSubstr("TEXT"))) << c << ":\n" << h.out;
  }
  auto t = run_cli({"trace", "--help"});
  EXPECT_THAT(t.out, HasSubstr("MODEL DIR"));
  EXPECT_THAT(t.out, HasSubstr("--save FILE"));
  EXPECT_THAT(t.out, HasSubstr("--dtype DTYPE=bf16"));  // the default
  EXPECT_THAT(t.out, HasSubstr("--attention PROFILE=eager"));
  EXPECT_THAT(t.out, HasSubstr("sdpa"));
  EXPECT_THAT(run_cli({"merge", "--help"}).out, HasSubstr("--base DIR"));
  EXPECT_THAT(run_cli({"merge", "--help"}).out, HasSubstr("--dtype DTYPE=auto"));
  EXPECT_THAT(run_cli({"check", "--help"}).out, HasSubstr("--dtype LIST=bf16,fp16"));
  EXPECT_THAT(run_cli({"tokenize", "--help"}).out, HasSubstr("SOURCE PATH"));
}

TEST(CliUsage, OneDtypeSpellingTableAndSdpa) {
  const auto m = fixture("models/qwen3-tiny");
  auto r = run_cli(
      {"trace", m, "--ids", "1,2,3", "--dtype", "torch.Float16", "--attention", "SDPA", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.json()["dtype"], "fp16");
  EXPECT_EQ(r.json()["attention"], "fused");
  // auto: the checkpoint's dtype (config.json says bfloat16).
  auto a = run_cli({"trace", m, "--ids", "1,2,3", "--dtype", "auto", "--json"});
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_EQ(a.json()["dtype"], "bf16");
  auto f = run_cli(
      {"trace", fixture("models/qwen3-tiny-fp32"), "--ids", "1", "--dtype", "AUTO", "--json"});
  ASSERT_EQ(f.exit_code, 0) << f.err;
  EXPECT_EQ(f.json()["dtype"], "fp32");
  auto bad = run_cli({"trace", m, "--ids", "1", "--dtype", "fp8"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_THAT(bad.err, HasSubstr("float32, bfloat16, float16"));
  EXPECT_EQ(run_cli({"check", m, "--ids", "1", "--dtype", "BFloat16,half"}).exit_code, 0);
}

TEST(CliUsage, SilentFixesAreErrors) {
  const auto m = fixture("models/qwen3-tiny");
  struct Case {
    std::vector<std::string> args;
    std::string says;
  };
  const std::vector<Case> cases = {
      {{"check", m, "--ids", "1", "--dtype", "bf16,bf16"}, "bf16 is listed twice"},
      {{"check", m, "--ids", "1", "--dtype", "bf16,auto"}, "bf16 is listed twice"},
      {{"check", m, "--ids", "1", "--dtype", ""}, "empty item 1"},
      {{"check", m, "--ids", "1", "--dtype", "bf16,"}, "empty item 2"},
      {{"check", m, "--ids", "1", "--dtype", "bf16,,fp16"}, "empty item 2"},
      {{"trace", m, "--ids", "1,,2"}, "empty item 2"},
      {{"trace", m, "--ids", "1,2,"}, "empty item 3"},
      {{"trace", m, "--ids", "1 2"}, "\"1 2\" is not a token id"},
      {{"trace", m, "--ids=-1"}, "is not a token id"},
      {{"trace", m, "--ids", "1", "--threads", "-1"}, "--threads"},
      {{"check", m, "--ids", "1", "--threads", "-2"}, "--threads"},
      {{"check", m, "--ids", "1", "--attention", "flash"}, "sdpa"},
  };
  for (const auto& c : cases) {
    auto r = run_cli(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.says;
    EXPECT_THAT(r.err, HasSubstr(c.says));
  }
  // The spellings that stay: a JSON-like list, spaces after commas.
  auto ok = run_cli({"trace", m, "--ids", "[1, 2, 3]", "--json"});
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_EQ(ok.json()["tokens"], nlohmann::json::parse("[1, 2, 3]"));
  TempDir d;
  std::ofstream(d.path / "in.jsonl") << "{\"id\": \"a\", \"ids\": [1, 2]}\n";
  auto h = run_cli({"hidden", m, "--input", (d.path / "in.jsonl").string(), "--out",
                    (d.path / "out").string(), "--layers", "0,,1"});
  EXPECT_EQ(h.exit_code, 2);
  EXPECT_THAT(h.err, HasSubstr("--layers 0,,1"));
}

TEST(CliUsage, PathsThatAreNotThereOrNotWhatTheyArePassedAs) {
  auto r = run_cli({"scan", "/nonexistent/model"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("/nonexistent/model: no such file or directory"));
  // An adapter passed as MODEL: use --adapter.
  auto a = run_cli({"scan", fixture("adapters/lora-bf16")});
  EXPECT_EQ(a.exit_code, 2);
  EXPECT_THAT(a.err, HasSubstr("PEFT adapter (adapter_config.json), not a model"));
  EXPECT_THAT(a.err, HasSubstr("--adapter"));
  EXPECT_EQ(run_cli({"check", fixture("adapters/lora-bf16")}).exit_code, 2);
  // A model passed as --adapter.
  TempDir d;
  auto m = run_cli({"merge", "--base", fixture("models/qwen3-tiny"), "--adapter",
                    fixture("models/qwen3-tiny"), "--out", (d.path / "o").string()});
  EXPECT_EQ(m.exit_code, 2);
  EXPECT_THAT(m.err, HasSubstr("this is a model checkpoint (config.json), not a PEFT adapter"));
  // A file where a directory is expected.
  auto f = run_cli({"scan", fixture("models/qwen3-tiny/config.json")});
  EXPECT_EQ(f.exit_code, 2);
  EXPECT_THAT(f.err, HasSubstr("is a file, not a directory"));
  // An unsupported model_type names config.json, in every command.
  const auto bert = copy_with_config(d.path / "bert", "models/qwen3-tiny",
                                     [](nlohmann::json& c) { c["model_type"] = "bert"; });
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"scan", bert.string()},
        std::vector<std::string>{"trace", bert.string(), "--ids", "1"}}) {
    auto b = run_cli(args);
    EXPECT_EQ(b.exit_code, 2);
    EXPECT_THAT(b.err, HasSubstr((bert / "config.json").string() + ": model_type \"bert\""));
  }
}

TEST(CliUsage, JsonFailuresAreOneJsonDocument) {
  auto nf = run_cli({"scan", "/nonexistent/model", "--json"});
  expect_error_json(nf, "not_found");
  EXPECT_EQ(nf.json()["error"]["file"], "/nonexistent/model");
  auto usage = run_cli({"trace", fixture("models/qwen3-tiny"), "--ids", "1,x", "--json"});
  expect_error_json(usage, "usage");
  EXPECT_TRUE(usage.json()["error"]["file"].is_null());
  expect_error_json(run_cli({"trace", "--json"}), "usage");  // CLI11: MODEL is required
  expect_error_json(
      run_cli({"check", fixture("models/qwen3-tiny"), "--ids", "1", "--threads", "-1", "--json"}),
      "usage");
  // A broken file: kind input, the file named.
  auto bad = run_cli({"scan", fixture("models/qwen3-truncated"), "--json"});
  expect_error_json(bad, "input");
  EXPECT_THAT(bad.json()["error"]["file"].get<std::string>(), HasSubstr("qwen3-truncated"));
  auto tok = run_cli({"tokenize", "/nonexistent/tokenizer.json", "--text", "x", "--json"});
  expect_error_json(tok, "not_found");
  // Without --json, stdout stays empty on failure.
  EXPECT_EQ(run_cli({"scan", "/nonexistent/model"}).out, "");
}

TEST(CliUsage, HubIdsFromTheLocalCache) {
  TempDir d;
  const fs::path cache = d.path / "hub";
  const auto snap = add_snapshot(cache, "Org/Tiny", fake_commit('a'), fixture("models/qwen3-tiny"));
  add_snapshot(cache, "Org/Tiny", fake_commit('b'), fixture("models/qwen3-tiny-fp32"));
  add_ref(cache, "Org/Tiny", "main", fake_commit('a'));
  add_ref(cache, "Org/Tiny", "fp32", fake_commit('b'));
  add_snapshot(cache, "Org/Lora", fake_commit('c'), fixture("adapters/lora-bf16"));
  add_ref(cache, "Org/Lora", "main", fake_commit('c'));
  const auto env = hub_env(cache);

  auto s = run_cli({"scan", "Org/Tiny", "--json"}, env);
  ASSERT_EQ(s.exit_code, 0) << s.err;
  EXPECT_EQ(s.json()["model"], snap.string());
  EXPECT_THAT(s.err, HasSubstr("Org/Tiny is " + snap.string()));  // where it resolved
  auto t = run_cli({"trace", "Org/Tiny@fp32", "--ids", "1,2", "--dtype", "auto", "--json"}, env);
  ASSERT_EQ(t.exit_code, 0) << t.err;
  EXPECT_EQ(t.json()["dtype"], "fp32");
  auto c = run_cli(
      {"trace", "Org/Tiny@" + fake_commit('b'), "--ids", "1", "--dtype", "auto", "--json"}, env);
  ASSERT_EQ(c.exit_code, 0) << c.err;
  EXPECT_EQ(c.json()["dtype"], "fp32");
  // --base and --adapter too.
  auto m = run_cli({"merge", "--base", "Org/Tiny", "--adapter", "Org/Lora", "--out",
                    (d.path / "merged").string(), "--json"},
                   env);
  ASSERT_EQ(m.exit_code, 0) << m.err;
  EXPECT_TRUE(fs::exists(d.path / "merged" / "config.json"));
  EXPECT_FALSE(fs::is_symlink(d.path / "merged" / "config.json"));
  auto ck = run_cli({"check", (d.path / "merged").string(), "--base", "Org/Tiny", "--adapter",
                     "Org/Lora", "--ids", "1,2,3", "--dtype", "bf16"},
                    env);
  EXPECT_EQ(ck.exit_code, 0) << ck.out << ck.err;

  // Missing: where it looked, and how to download it.
  auto miss = run_cli({"scan", "Org/Missing"}, env);
  EXPECT_EQ(miss.exit_code, 2);
  EXPECT_THAT(miss.err, HasSubstr((cache / "models--Org--Missing").string()));
  EXPECT_THAT(miss.err, HasSubstr("hf download Org/Missing"));
  auto rev = run_cli({"scan", "Org/Tiny@v9", "--json"}, env);
  expect_error_json(rev, "not_found");
  EXPECT_THAT(rev.json()["error"]["message"].get<std::string>(), HasSubstr("revision v9"));
  // HF_HOME/hub when HF_HUB_CACHE is not set; HF_HUB_CACHE first when both are.
  auto home_env = kNoHubEnv;
  home_env.push_back("HF_HOME=" + d.path.string());
  EXPECT_EQ(run_cli({"scan", "Org/Tiny"}, home_env).exit_code, 0);
  home_env.push_back("HF_HUB_CACHE=" + (d.path / "elsewhere").string());
  auto first = run_cli({"scan", "Org/Tiny"}, home_env);
  EXPECT_EQ(first.exit_code, 2);
  EXPECT_THAT(first.err, HasSubstr((d.path / "elsewhere" / "models--Org--Tiny").string()));
}

TEST(CliUsage, CheckPicksADefaultPromptThatFits) {
  // qwen3-example-base: the real Qwen3 tokenizer, a 10240-token vocabulary. The long default
  // prompt needs ids beyond it; the short one fits.
  auto r = run_cli({"check", fixture("models/qwen3-example-base"), "--dtype", "bf16", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = r.json();
  EXPECT_EQ(j["tokens"], nlohmann::json::parse("[9707, 11, 1879, 0]"));
  EXPECT_THAT(j["prompt"].get<std::string>(), HasSubstr("the short prompt \"Hello, world!\""));
  EXPECT_THAT(j["prompt"].get<std::string>(), HasSubstr("beyond vocab_size 10240"));
  auto text = run_cli({"check", fixture("models/qwen3-example-base"), "--dtype", "bf16"});
  EXPECT_THAT(text.out, HasSubstr("Input: the short prompt \"Hello, world!\""));
  // No tokenizer.json: ids 1..8.
  auto ids = run_cli({"check", fixture("models/qwen3-tiny"), "--dtype", "bf16", "--json"});
  ASSERT_EQ(ids.exit_code, 0) << ids.err;
  EXPECT_EQ(ids.json()["tokens"], nlohmann::json::parse("[1, 2, 3, 4, 5, 6, 7, 8]"));
  EXPECT_THAT(ids.json()["prompt"].get<std::string>(), HasSubstr("ids 1..8 (no tokenizer.json)"));
}

TEST(CliUsage, MergeNamesTheFixFirstAndJudgesFidelityInWords) {
  TempDir d;
  // fp16 overflow of W + dW from a finite base and adapter: merge into bf16.
  auto o = run_cli({"merge", "--base", fixture("models/qwen3-tiny-fp16"), "--adapter",
                    fixture("adapters/fp16-overflow"), "--out", (d.path / "o1").string()});
  EXPECT_EQ(o.exit_code, 1) << o.err;
  const size_t fix = o.out.find("fix: merge into bf16 (--dtype bf16");
  const size_t allow = o.out.find("--allow-nonfinite");
  EXPECT_NE(fix, std::string::npos) << o.out;
  EXPECT_NE(allow, std::string::npos) << o.out;
  EXPECT_LT(fix, allow) << o.out;
  auto oj =
      run_cli({"merge", "--base", fixture("models/qwen3-tiny-fp16"), "--adapter",
               fixture("adapters/fp16-overflow"), "--out", (d.path / "o1").string(), "--json"});
  EXPECT_THAT(oj.json()["nonfinite"][0]["fix"].get<std::string>(), HasSubstr("--dtype bf16"));
  EXPECT_EQ(oj.json()["fixes"].size(), 1u);
  // ... and the fix works.
  EXPECT_EQ(run_cli({"merge", "--base", fixture("models/qwen3-tiny-fp16"), "--adapter",
                     fixture("adapters/fp16-overflow"), "--out", (d.path / "o2").string(),
                     "--dtype", "bf16"})
                .exit_code,
            0);
  // NaN in the adapter itself: the adapter tensor to look at.
  auto p = run_cli({"merge", "--base", fixture("models/qwen3-tiny"), "--adapter",
                    fixture("adapters/poisoned"), "--out", (d.path / "o3").string()});
  EXPECT_EQ(p.exit_code, 1);
  const size_t look = p.out.find("fix: look at the adapter tensor(s) base_model.model.");
  EXPECT_NE(look, std::string::npos) << p.out;
  EXPECT_LT(look, p.out.find("--allow-nonfinite")) << p.out;
  // Fidelity in words.
  auto f32 = run_cli({"merge", "--base", fixture("models/qwen3-tiny"), "--adapter",
                      fixture("adapters/lora-bf16"), "--out", (d.path / "o4").string(), "--dtype",
                      "fp32", "--json"});
  ASSERT_EQ(f32.exit_code, 0) << f32.err;
  EXPECT_EQ(f32.json()["fidelity"]["verdict"], "update kept exactly");
  auto b16 = run_cli({"merge", "--base", fixture("models/qwen3-tiny"), "--adapter",
                      fixture("adapters/lora-bf16"), "--out", (d.path / "o5").string()});
  ASSERT_EQ(b16.exit_code, 0) << b16.err;
  // lora-bf16 into bf16: 1.5% rounding noise, but the update's direction kept (projected
  // 1.0001): rounding noise, not a lost update.
  EXPECT_THAT(b16.out, ::testing::ContainsRegex(
                           "fidelity: update kept \\(projected 1\\.000\\), with bf16 rounding "
                           "noise of 1\\.5% of its size on top"));
  // An update mostly below bf16's resolution of W: the same adapter scaled down 1000x
  // (lora_B / 1000) loses most of it, and the verdict says so.
  const fs::path small = d.path / "small";
  fs::create_directories(small);
  fs::copy_file(fixture("adapters/lora-bf16/adapter_config.json"), small / "adapter_config.json");
  {
    const auto src = SafetensorsFile::open(fixture("adapters/lora-bf16/adapter_model.safetensors"));
    std::vector<TensorSpec> specs;
    for (const auto& t : src->tensors()) specs.push_back({t.name, t.dtype, t.shape});
    SafetensorsWriter w(small / "adapter_model.safetensors", specs, {});
    for (const auto& t : src->tensors()) {
      std::vector<float> v(size_t(t.numel()));
      load_to_f32(src->data(t).data(), t.dtype, v.data(), v.size());
      if (t.name.find("lora_B") != std::string::npos)
        for (float& x : v) x /= 1000.0f;
      std::vector<std::byte> out(src->data(t).size());
      store_from_f32(v.data(), t.dtype, out.data(), v.size());
      w.write(out);
    }
    w.commit();
  }
  auto lost = run_cli({"merge", "--base", fixture("models/qwen3-tiny"), "--adapter", small.string(),
                       "--out", (d.path / "o6").string(), "--json"});
  ASSERT_EQ(lost.exit_code, 0) << lost.err;
  const std::string v = lost.json()["fidelity"]["verdict"];
  EXPECT_THAT(v, ::testing::ContainsRegex(
                     "^[0-9.]+% of the update lost to rounding into bf16 \\([0-9]+ of [0-9]+ "
                     "updated elements kept the base value\\): merge into fp32 \\(--dtype "
                     "fp32\\) or apply the adapter unmerged \\(--adapter\\) to keep it$"))
      << v;
}

TEST(CliUsage, MergeOverflowingEvenFp32NamesTheAdapterTensors) {
  // lora-bf16 with one module's A and B scaled by 1e25: each finite, their product beyond fp32.
  TempDir d;
  const fs::path ad = d.path / "huge";
  fs::create_directories(ad);
  fs::copy_file(fixture("adapters/lora-bf16/adapter_config.json"), ad / "adapter_config.json");
  auto src = SafetensorsFile::open(fixture("adapters/lora-bf16/adapter_model.safetensors"));
  std::vector<PlantedTensor> ts;
  for (const auto& t : src->tensors()) {
    PlantedTensor p{t.name, t.dtype, t.shape, std::vector<float>(t.numel())};
    load_to_f32(src->data(t).data(), t.dtype, p.values.data(), p.values.size());
    if (t.name.find("layers.0.self_attn.q_proj.lora_") != std::string::npos)
      for (float& v : p.values) v *= 1e25f;
    ts.push_back(std::move(p));
  }
  write_tensors(ad / "adapter_model.safetensors", ts);
  auto r = run_cli({"merge", "--base", fixture("models/qwen3-tiny"), "--adapter", ad.string(),
                    "--out", (d.path / "o").string(), "--dtype", "fp32", "--json"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  const auto j = r.json();
  ASSERT_EQ(j["nonfinite"].size(), 1u) << r.out;
  EXPECT_EQ(j["nonfinite"][0]["cause"], "arithmetic");
  const std::string fix = j["nonfinite"][0]["fix"];
  EXPECT_THAT(fix, HasSubstr("look at the adapter tensor(s) "
                             "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
  EXPECT_THAT(fix, HasSubstr("overflows even fp32"));
  EXPECT_THAT(fix, Not(HasSubstr("--dtype")));
}
