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
#include "common/mapped_files.hpp"
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

// ---- files truncated while mapped ----

fs::path write_big_file(const fs::path& p) {
  std::vector<float> v(64 * 1024, 1.0f);  // 256 KB of data: many pages past any new end
  SafetensorsWriter w(p, {{"w", DType::F32, {int64_t(v.size())}}});
  w.write(std::as_bytes(std::span<const float>(v)));
  w.commit();
  return p;
}

TEST(MappedFiles, SizeChangeIsAnInputErrorAtTheNextCheck) {
  TempDir d;
  const fs::path p = write_big_file(d.path / "model.safetensors");
  auto f = SafetensorsFile::open(p);
  EXPECT_NO_THROW(f->check_unchanged());
  ::truncate(p.c_str(), 4096);
  try {
    f->check_unchanged();
    FAIL() << "no error";
  } catch (const SafetensorsError& e) {
    EXPECT_EQ(e.kind(), SafetensorsErrorKind::Changed);
    EXPECT_THAT(e.what(), HasSubstr(p.string() + ": changed while reading: the file is now 4096"));
    EXPECT_THAT(e.what(), HasSubstr("another process is writing it?"));
  }
}

TEST(MappedFilesDeathTest, ReadingPastATruncationExitsTwoNamingTheFile) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  TempDir d;
  const fs::path p = write_big_file(d.path / "model.safetensors");
  EXPECT_EXIT(
      {
        install_mapping_fault_handler();
        auto f = SafetensorsFile::open(p);
        ::truncate(p.c_str(), 100);  // a save_pretrained starting over
        const auto bytes = f->data(f->tensors()[0]);
        volatile std::byte sink = bytes[bytes.size() - 1];
        (void)sink;
        ::_exit(0);
      },
      ::testing::ExitedWithCode(2),
      "nanscope: error: .*model.safetensors: changed while reading: the file is now 100 "
      "bytes, shorter than the [0-9]+ it had when it was opened \\(another process is writing "
      "it\\?\\)");
}

TEST(MappedFiles, FaultMessageIsFormattedWithoutTheHeap) {
  char buf[512];
  const size_t n = format_mapping_fault(buf, sizeof buf, "/nonexistent/x.safetensors", 10);
  EXPECT_EQ(std::string(buf, n),
            "nanscope: error: /nonexistent/x.safetensors: changed while reading: part of the file "
            "could no longer be read (another process truncating it, or an I/O error of the disk "
            "or network file system?)\n");
  char small[20];
  EXPECT_EQ(format_mapping_fault(small, sizeof small, "/x", 1), 19u);  // cut, NUL-terminated
}

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
