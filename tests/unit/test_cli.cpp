// The command-line contract of trace, tokenize and merge as scripts meet it: exit codes, the
// --json documents, files written, messages on bad input.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <fstream>
#include <iterator>

#include "cli_util.hpp"
#include "formats/safetensors.hpp"

using namespace nanscope;
using namespace nanscope::testing;
using ::testing::HasSubstr;

TEST(Cli, TokenizeMatchesTheReference) {
  // [9707, 11, 1879, 0] is what Hugging Face tokenizers gives for Qwen3 (reference-facts 8).
  auto r =
      run_cli({"tokenize", fixture("models/qwen3-example"), "--text", "Hello, world!", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.json()["ids"], nlohmann::json::parse("[9707, 11, 1879, 0]"));
  auto file =
      run_cli({"tokenize", fixture("tokenizer/qwen3/tokenizer.json"), "--text", "Hello, world!"});
  EXPECT_EQ(file.exit_code, 0);
  EXPECT_THAT(file.out, HasSubstr("[9707, 11, 1879, 0]"));
  EXPECT_EQ(run_cli({"tokenize", "/nonexistent", "--text", "x"}).exit_code, 2);
}

TEST(Cli, TraceTextSaveAndExitCodes) {
  TempDir d;
  const auto save = (d.path / "states.safetensors").string();
  auto r = run_cli({"trace", fixture("models/qwen3-example-base"), "--text", "Hello, world!",
                    "--dtype", "bf16", "--save", save, "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = r.json();
  EXPECT_EQ(j["dtype"], "bf16");
  EXPECT_EQ(j["attention"], "eager");
  EXPECT_EQ(j["tokens"], nlohmann::json::parse("[9707, 11, 1879, 0]"));
  EXPECT_EQ(j["hidden"].size(), 4u);  // embeddings + 3 layers (the last after the final norm)
  EXPECT_TRUE(j["first_nonfinite"].is_null());
  auto f = SafetensorsFile::open(save);
  ASSERT_NE(f->find("hidden.3"), nullptr);
  EXPECT_EQ(f->find("hidden.0")->shape, (std::vector<int64_t>{4, 64}));
  EXPECT_EQ(f->find("logits")->shape, (std::vector<int64_t>{4, 10240}));
  EXPECT_EQ(f->find("input_ids")->dtype, DType::I64);

  auto bad = run_cli({"trace", fixture("models/qwen3-example"), "--ids", "9707,11,1879,0"});
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_THAT(bad.out, HasSubstr("Layer 1: [1, 4, 64]"));
  EXPECT_THAT(bad.out, HasSubstr("model.layers.0.self_attn.q_proj"));

  auto oov = run_cli({"trace", fixture("models/qwen3-tiny"), "--ids", "1,99999"});
  EXPECT_EQ(oov.exit_code, 2);
  EXPECT_THAT(oov.err, HasSubstr("99999"));
  EXPECT_EQ(run_cli({"trace", fixture("models/qwen3-tiny"), "--ids", "1,x"}).exit_code, 2);
  EXPECT_EQ(
      run_cli({"trace", fixture("models/qwen3-tiny"), "--ids", "1", "--dtype", "fp8"}).exit_code,
      2);
  EXPECT_EQ(run_cli({"trace", fixture("models/qwen3-tiny")}).exit_code, 2);  // no input
  EXPECT_EQ(run_cli({"trace", fixture("models/qwen3-missing"), "--ids", "1"}).exit_code, 2);
  EXPECT_EQ(run_cli({"nonsense"}).exit_code, 2);
  EXPECT_EQ(run_cli({"--help"}).exit_code, 0);
}

TEST(Cli, MergeWritesAWholeCheckpointOrNothing) {
  TempDir d;
  const auto out = (d.path / "merged").string();
  auto r = run_cli({"merge", "--base", fixture("models/qwen3-tiny"), "--adapter",
                    fixture("adapters/lora-bf16"), "--out", out, "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = r.json();
  EXPECT_EQ(j["out_dtype"], "bf16");
  EXPECT_GT(j["merged"].get<int>(), 0);
  EXPECT_TRUE(j["fidelity"].contains("kept"));
  EXPECT_TRUE(std::filesystem::exists(out + "/config.json"));
  // The merged model scans and checks clean.
  EXPECT_EQ(run_cli({"scan", out}).exit_code, 0);
  // An existing non-empty --out is refused and left alone.
  EXPECT_EQ(run_cli({"merge", "--base", fixture("models/qwen3-tiny"), "--adapter",
                     fixture("adapters/lora-bf16"), "--out", out})
                .exit_code,
            2);
  EXPECT_TRUE(std::filesystem::exists(out + "/model.safetensors"));
  // A poisoned adapter: refused with exit 1, no directory left behind.
  const auto out2 = (d.path / "poisoned").string();
  auto p = run_cli({"merge", "--base", fixture("models/qwen3-tiny"), "--adapter",
                    fixture("adapters/poisoned"), "--out", out2});
  EXPECT_EQ(p.exit_code, 1);
  EXPECT_THAT(p.out, HasSubstr("lora_B"));
  EXPECT_FALSE(std::filesystem::exists(out2));
  for (const auto& e : std::filesystem::directory_iterator(d.path))
    EXPECT_THAT(e.path().filename().string(), ::testing::Not(HasSubstr(".tmp")));
  // --no-fsync (page cache, no fsync): the same files, byte for byte.
  const auto out3 = (d.path / "nofsync").string();
  auto nf = run_cli({"merge", "--base", fixture("models/qwen3-tiny"), "--adapter",
                     fixture("adapters/lora-bf16"), "--out", out3, "--no-fsync"});
  ASSERT_EQ(nf.exit_code, 0) << nf.err;
  for (const auto& e : std::filesystem::directory_iterator(out)) {
    const auto name = e.path().filename().string();
    auto slurp = [](const std::string& f) {
      std::ifstream in(f, std::ios::binary);
      return std::string(std::istreambuf_iterator<char>(in), {});
    };
    EXPECT_EQ(slurp(out3 + "/" + name), slurp(e.path().string())) << name;
  }
  // A missing adapter file: exit 2 naming it.
  auto m = run_cli({"merge", "--base", fixture("models/qwen3-tiny"), "--adapter", "/nonexistent/a",
                    "--out", (d.path / "x").string()});
  EXPECT_EQ(m.exit_code, 2);
  EXPECT_THAT(m.err, HasSubstr("/nonexistent/a"));
}
