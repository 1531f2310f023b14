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
#include <functional>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "cli_util.hpp"
#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "common/mapped_files.hpp"
#include "common/temp_files.hpp"
#include "formats/adapter.hpp"
#include "formats/hf_config.hpp"
#include "formats/safetensors.hpp"
#include "tokenizer/bpe.hpp"
#include "tools/hidden.hpp"

namespace nanscope {
namespace {

namespace fs = std::filesystem;
using testing::fixture;
using ::testing::HasSubstr;
using testing::run_cli;
using testing::TempDir;

// The PID of a process that has ended (and been reaped): no process has it for a while.
pid_t dead_pid() {
  const pid_t p = ::fork();
  if (p == 0) ::_exit(0);
  int st = 0;
  ::waitpid(p, &st, 0);
  return p;
}

// A child that lives until killed.
struct LiveChild {
  pid_t pid = ::fork();
  LiveChild() {
    if (pid == 0) {
      for (;;) ::pause();
    }
  }
  ~LiveChild() {
    ::kill(pid, SIGKILL);
    int st = 0;
    ::waitpid(pid, &st, 0);
  }
};

void write_bytes(const fs::path& p, size_t n) {
  std::ofstream(p, std::ios::binary) << std::string(n, 'x');
}

fs::path tmp_of(const fs::path& final_path, long pid) {
  fs::path p = final_path;
  p += ".tmp-" + std::to_string(pid);
  return p;
}

TEST(TempFiles, StaleTemporaryOfADeadProcessIsRemovedALiveOneKept) {
  TempDir d;
  const fs::path out = d.path / "merged";
  const pid_t dead = dead_pid();
  LiveChild live;
  const fs::path stale = tmp_of(out, dead), alive = tmp_of(out, live.pid);
  fs::create_directories(stale / "sub");
  write_bytes(stale / "model.safetensors", 1000);
  write_bytes(stale / "sub" / "x", 24);
  fs::create_directory(alive);
  write_bytes(alive / "model.safetensors", 10);
  // Not temporaries of this output: another name, a PID that is not a number.
  const fs::path other = tmp_of(d.path / "other", dead);
  fs::create_directory(other);
  fs::create_directory(d.path / "merged.tmp-abc");

  const auto removed = remove_stale_temporaries(out);
  ASSERT_EQ(removed.size(), 1u);
  EXPECT_EQ(removed[0].path, stale);
  EXPECT_EQ(removed[0].pid, dead);
  EXPECT_EQ(removed[0].bytes, 1024u);
  EXPECT_TRUE(removed[0].error.empty());
  EXPECT_EQ(describe(removed[0]),
            "removed stale temporary " + stale.string() + " of a dead process (1024 bytes)");
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_TRUE(fs::exists(alive / "model.safetensors"));
  EXPECT_TRUE(fs::exists(other));
  EXPECT_TRUE(fs::exists(d.path / "merged.tmp-abc"));
}

TEST(TempFiles, OwnPidIsStaleUnlessThisProcessRegisteredIt) {
  TempDir d;
  const fs::path a = d.path / "a.json", b = d.path / "b.json";
  write_bytes(temporary_path(a), 5);  // left by an earlier process that had our PID
  const fs::path tb = claim_temporary(b);
  write_bytes(tb, 5);
  EXPECT_EQ(remove_stale_temporaries(a).size(), 1u);
  EXPECT_TRUE(remove_stale_temporaries(b).empty());
  EXPECT_TRUE(fs::exists(tb));
  unregister_temporary(tb);
}

TEST(TempFiles, StaleShardsAndIndexOfHiddenByPattern) {
  TempDir d;
  const pid_t dead = dead_pid();
  write_bytes(tmp_of(d.path / "hidden-00003.safetensors", dead), 100);
  write_bytes(tmp_of(d.path / "index.json", dead), 7);
  write_bytes(tmp_of(d.path / "notes.txt", dead), 7);
  const auto removed = remove_stale_temporaries_in(d.path, [](std::string_view b) {
    return b == "index.json" || (b.starts_with("hidden-") && b.ends_with(".safetensors"));
  });
  EXPECT_EQ(removed.size(), 2u);
  EXPECT_TRUE(fs::exists(tmp_of(d.path / "notes.txt", dead)));
}

TEST(TempFiles, ClaimReportsWhatItRemovedThroughTheNoticeSink) {
  TempDir d;
  const fs::path out = d.path / "report.html";
  write_bytes(tmp_of(out, dead_pid()), 3);
  std::vector<std::string> notices;
  set_notice_sink([&](const std::string& m) { notices.push_back(m); });
  const fs::path tmp = claim_temporary(out);
  set_notice_sink(nullptr);
  unregister_temporary(tmp);
  ASSERT_EQ(notices.size(), 1u);
  EXPECT_THAT(notices[0], HasSubstr("removed stale temporary"));
  EXPECT_THAT(notices[0], HasSubstr("(3 bytes)"));
  EXPECT_TRUE(fs::is_empty(d.path));
}

TEST(TempFiles, InterruptCleanupRemovesRegisteredFilesAndDirectories) {
  TempDir d;
  const fs::path dir = claim_temporary(d.path / "merged");
  fs::create_directory(dir);
  write_bytes(dir / "model.safetensors", 64);
  const fs::path file = claim_temporary(d.path / "hidden-00001.safetensors");
  write_bytes(file, 16);
  const fs::path done = claim_temporary(d.path / "index.json");  // renamed into place already
  set_interrupt_note("hidden: 1 input(s) complete");
  const std::vector<std::string> lines = remove_registered_temporaries();
  set_interrupt_note("");
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0], "removed temporary " + dir.string() + " (64 bytes)");
  EXPECT_EQ(lines[1], "removed temporary " + file.string() + " (16 bytes)");
  EXPECT_EQ(lines[2], "hidden: 1 input(s) complete");
  EXPECT_FALSE(fs::exists(dir));
  EXPECT_FALSE(fs::exists(file));
  EXPECT_TRUE(fs::is_empty(d.path));
  (void)done;
}

TEST(TempFiles, WritersUnregisterWhatTheyRenamed) {
  TempDir d;
  write_file_atomic(d.path / "a.json", "{}\n");
  {
    SafetensorsWriter w(d.path / "x.safetensors", {{"t", DType::F32, {2}}});
    const float v[2] = {1, 2};
    w.write(std::as_bytes(std::span<const float>(v)));
    w.commit();
  }
  {  // destroyed without commit: removed and unregistered
    SafetensorsWriter w(d.path / "y.safetensors", {{"t", DType::F32, {2}}});
  }
  EXPECT_TRUE(remove_registered_temporaries().empty());
  EXPECT_TRUE(fs::exists(d.path / "a.json"));
  EXPECT_TRUE(fs::exists(d.path / "x.safetensors"));
  EXPECT_FALSE(fs::exists(d.path / "y.safetensors"));
}

// ---- the command line ----

TEST(CliTempFiles, MergeRemovesTheStaleTemporaryOfAKilledMergeAndSaysSo) {
  TempDir d;
  const fs::path out = d.path / "merged", stale = tmp_of(out, dead_pid());
  fs::create_directory(stale);
  write_bytes(stale / "model.safetensors", 4096);
  auto r = run_cli({"merge", "--base", fixture("models/qwen3-tiny"), "--adapter",
                    fixture("adapters/lora-bf16"), "--out", out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("nanscope: removed stale temporary " + stale.string() +
                               " of a dead process (4096 bytes)"));
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_TRUE(fs::exists(out / "model.safetensors"));
}

TEST(CliTempFiles, HiddenRemovesStaleShardTemporaries) {
  TempDir d;
  const fs::path out = d.path / "states", in = d.path / "in.jsonl";
  fs::create_directory(out);
  const pid_t dead = dead_pid();
  write_bytes(tmp_of(out / "hidden-00001.safetensors", dead), 500);
  write_bytes(tmp_of(out / "index.json", dead), 5);
  std::ofstream(in) << "{\"id\": \"a\", \"ids\": [1, 2]}\n";
  auto r = run_cli(
      {"hidden", fixture("models/qwen3-tiny"), "--input", in.string(), "--out", out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("hidden-00001.safetensors.tmp-" + std::to_string(dead) +
                               " of a dead process (500 bytes)"));
  EXPECT_THAT(r.err, HasSubstr("index.json.tmp-"));
  for (const auto& e : fs::directory_iterator(out))
    EXPECT_THAT(e.path().filename().string(), ::testing::Not(HasSubstr(".tmp-")));
}

// Ctrl-C in the middle of a long `hidden` run (many one-token shards): the temporaries go at
// once, the shards already complete stay listed in the index, the status is 128 + SIGINT, and
// a rerun finishes the rest.
TEST(CliTempFiles, CtrlCDuringHiddenKeepsCompleteShardsAndLeavesNoTemporary) {
  TempDir d;
  const fs::path out = d.path / "states", in = d.path / "in.jsonl", err = d.path / "err.txt";
  constexpr int kInputs = 3000;
  {
    std::ofstream f(in);
    for (int i = 0; i < kInputs; ++i)
      f << "{\"id\": \"i" << i << "\", \"ids\": [" << i % 30 << "]}\n";
  }
  const std::string model = fixture("models/qwen3-tiny");
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int fd = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fd, 2);
    ::execl(NANSCOPE_BINARY, NANSCOPE_BINARY, "hidden", model.c_str(), "--input", in.c_str(),
            "--out", out.c_str(), "--batch-tokens", "1", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  // Wait for a few complete shards (the 4th in place: the index names the first 3), then
  // interrupt.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!fs::exists(out / "hidden-00004.safetensors") &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ::kill(pid, SIGINT);
  int st = 0;
  ::waitpid(pid, &st, 0);
  std::ifstream ef(err);
  const std::string msg((std::istreambuf_iterator<char>(ef)), std::istreambuf_iterator<char>());
  if (WIFEXITED(st) && WEXITSTATUS(st) == 0) GTEST_SKIP() << "the run finished before the signal";
  ASSERT_TRUE(WIFSIGNALED(st)) << "status " << st << ": " << msg;
  EXPECT_EQ(WTERMSIG(st), SIGINT);
  EXPECT_THAT(msg, HasSubstr("nanscope: interrupted: hidden: "));
  EXPECT_THAT(msg, HasSubstr("rerun the same command to resume"));
  std::cerr << msg;
  for (const auto& e : fs::directory_iterator(out))
    EXPECT_THAT(e.path().filename().string(), ::testing::Not(HasSubstr(".tmp-")));
  // Every shard the index names is there; a rerun computes only the rest.
  const nlohmann::json index = nlohmann::json::parse(std::ifstream(out / "index.json"));
  const size_t done = index["inputs"].size();
  EXPECT_GE(done, 3u);
  EXPECT_LT(done, size_t(kInputs));
  for (const auto& s : index["shards"]) EXPECT_TRUE(fs::exists(out / s.get<std::string>()));
  auto r = run_cli({"hidden", model, "--input", in.string(), "--out", out.string(),
                    "--batch-tokens", "4096", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.json()["skipped"].get<size_t>(), done);
  EXPECT_EQ(r.json()["written"].get<size_t>(), kInputs - done);
}

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

TEST(MappedFilesDeathTest, WithJsonTheFaultIsAlsoAJsonDocumentOnStdout) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  TempDir d;
  const fs::path p = write_big_file(d.path / "model \"q\".safetensors");  // a quote to escape
  EXPECT_EXIT(
      {
        install_mapping_fault_handler();
        set_mapping_fault_json(true);
        ::dup2(STDERR_FILENO, STDOUT_FILENO);  // the death test sees stderr only
        auto f = SafetensorsFile::open(p);
        ::truncate(p.c_str(), 100);
        const auto bytes = f->data(f->tensors()[0]);
        volatile std::byte sink = bytes[bytes.size() - 1];
        (void)sink;
        ::_exit(0);
      },
      ::testing::ExitedWithCode(2),
      "\\{\"error\": \\{\"kind\": \"changed\", \"file\": \".*model \\\\\"q\\\\\"\\.safetensors\", "
      "\"message\": \".*: changed while reading: the file is now 100 bytes.*\"\\}\\}");
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

// Found by hand past the fuzzers' 8 KB inputs: a million nested lists parsed, and then printing
// the value for the error message recursed until the stack overflowed (SIGSEGV, exit 139).
TEST(FuzzFindings, DeeplyNestedJsonIsAnInputErrorNotACrash) {
  auto nested = [](int d) { return std::string(size_t(d), '[') + std::string(size_t(d), ']'); };
  const std::string deep = nested(1000000);
  auto expect_too_deep = [](const std::function<void()>& f, const std::string& what) {
    try {
      f();
      ADD_FAILURE() << "no error for " << what;
    } catch (const InputError& e) {
      EXPECT_THAT(e.what(), HasSubstr(what));
      EXPECT_THAT(e.what(), HasSubstr("nests deeper than 128 levels"));
    }
  };
  expect_too_deep([&] { parse_json_text("{\"model_type\": " + deep + "}", "config.json"); },
                  "config.json: not valid JSON");
  expect_too_deep([&] { parse_adapter_config_text("{\"r\": " + deep + "}", "a.json"); },
                  "a.json: not valid JSON");
  expect_too_deep([&] { parse_hidden_jsonl("{\"id\": " + deep + "}\n", "in.jsonl", {}, {}); },
                  "in.jsonl:1: not valid JSON");
  expect_too_deep([&] { Tokenizer::from_json("{\"model\": {\"x\": " + deep + "}}", "t.json"); },
                  "tokenizer: t.json is not valid JSON");
  // Depths that real files could have still parse.
  EXPECT_NO_THROW(parse_json_text("{\"x\": " + nested(120) + "}", "config.json"));
}

TEST(FuzzFindings, DeeplyNestedConfigJsonExitsTwo) {
  TempDir d;
  fs::copy_file(fixture("models/qwen3-tiny/model.safetensors"), d.path / "model.safetensors");
  std::ofstream(d.path / "config.json")
      << "{\"model_type\": " << std::string(1000000, '[') << std::string(1000000, ']') << "}";
  auto r = run_cli({"scan", d.path.string()});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("config.json: not valid JSON (nests deeper than 128 levels)"));
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
