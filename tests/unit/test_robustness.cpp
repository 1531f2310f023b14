// Nothing left behind, nothing crashes (issue #16): stale temporaries of dead processes, the
// interrupt cleanup, files truncated while mapped, and the inputs the fuzzers found.
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "cli_util.hpp"
#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "formats/adapter.hpp"
#include "formats/hf_config.hpp"
#include "formats/safetensors.hpp"
#include "tools/hidden.hpp"

namespace nanscope {
namespace {

namespace fs = std::filesystem;
using testing::fixture;
using ::testing::HasSubstr;
using testing::run_cli;
using testing::TempDir;

// ---- what the fuzzers found ----

// A number beyond the double range is json::out_of_range (406), not a parse_error: it escaped
// the readers' catch and became "internal error".
TEST(FuzzFindings, NumberOverflowInConfigJsonIsAnInputError) {
  try {
    parse_json_text("{\"hidden_size\": 1e309}", "config.json");
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_THAT(e.what(), HasSubstr("config.json: not valid JSON"));
    EXPECT_THAT(e.what(), HasSubstr("number overflow"));
  }
  EXPECT_THROW(parse_adapter_config_text("{\"r\": 1e309}", "adapter_config.json"), InputError);
  const InputRules rules{32, 1e-3, false};
  try {
    parse_hidden_jsonl("{\"id\": \"a\", \"ids\": [1]}\n{\"id\": \"b\", \"ids\": [1e400]}\n",
                       "in.jsonl", {}, rules);
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_THAT(e.what(), HasSubstr("in.jsonl:2: invalid JSON"));
  }
}

TEST(FuzzFindings, NumberOverflowInTheHiddenIndexExitsTwo) {
  TempDir d;
  const fs::path out = d.path / "states", in = d.path / "in.jsonl";
  fs::create_directory(out);
  std::ofstream(out / "index.json") << "{\"format\": 1e999}";
  std::ofstream(in) << "{\"id\": \"a\", \"ids\": [1]}\n";
  auto r = run_cli(
      {"hidden", fixture("models/qwen3-tiny"), "--input", in.string(), "--out", out.string()});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("index.json: not valid JSON"));
  EXPECT_THAT(r.err, ::testing::Not(HasSubstr("internal error")));
}

}  // namespace
}  // namespace nanscope
