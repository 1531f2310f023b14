// Hub ids resolved offline from a cache laid out by hand as huggingface_hub lays it out (refs,
// snapshots, symlinks into blobs): which cache the environment names, which snapshot a revision
// names, and what a missing repository, revision or snapshot says.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <optional>

#include "cli_util.hpp"
#include "common/error.hpp"
#include "fake_hub.hpp"
#include "formats/checkpoint.hpp"
#include "formats/hub.hpp"

using namespace nanscope;
using namespace nanscope::testing;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

namespace {

// Sets (or with nullopt unsets) an environment variable for the scope, then restores it.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, std::optional<std::string> value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value)
      ::setenv(name, value->c_str(), 1);
    else
      ::unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_)
      ::setenv(name_, old_->c_str(), 1);
    else
      ::unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// No variable of the cache set: each test sets the ones it is about.
struct CleanHubEnv {
  ScopedEnv a{"HF_HUB_CACHE", std::nullopt}, b{"HUGGINGFACE_HUB_CACHE", std::nullopt},
      c{"HF_HOME", std::nullopt}, d{"XDG_CACHE_HOME", std::nullopt};
};

InputError error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e;
  }
  ADD_FAILURE() << "no InputError";
  return InputError("none");
}

}  // namespace

TEST(HubId, ParsedWithHuggingfaceHubsRules) {
  auto id = parse_hub_id("Qwen/Qwen3-4B");
  ASSERT_TRUE(id);
  EXPECT_EQ(id->repo_id, "Qwen/Qwen3-4B");
  EXPECT_EQ(id->revision, "main");
  id = parse_hub_id("gpt2");
  ASSERT_TRUE(id);
  EXPECT_EQ(id->repo_id, "gpt2");
  id = parse_hub_id("Org/Name.v2@v1.0");
  ASSERT_TRUE(id);
  EXPECT_EQ(id->repo_id, "Org/Name.v2");
  EXPECT_EQ(id->revision, "v1.0");
  id = parse_hub_id("Org/Name@refs/pr/1");
  ASSERT_TRUE(id);
  EXPECT_EQ(id->revision, "refs/pr/1");
  // Not repo ids (huggingface_hub's validate_repo_id refuses them too): paths and bad names.
  for (const char* s : {"", "a/b/c", "./model", "/abs/model", "~/model", "../model", "foo--bar",
                        "a..b", "Org/name.git", "-x", "x-", "Org/.x", "Org/Name@", "Org/Na me",
                        "Org/"
                        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"})
    EXPECT_FALSE(parse_hub_id(s)) << s;
}

TEST(HubCache, EnvironmentPrecedenceAsHuggingfaceHub) {
  CleanHubEnv clean;
  ScopedEnv home("HOME", "/home/u");
  EXPECT_EQ(hub_cache().dir, fs::path("/home/u/.cache/huggingface/hub"));
  {
    ScopedEnv xdg("XDG_CACHE_HOME", "/xdg");
    EXPECT_EQ(hub_cache().dir, fs::path("/xdg/huggingface/hub"));
    ScopedEnv hf_home("HF_HOME", "~/hf");  // ~ and $VARS expanded, as os.path does
    EXPECT_EQ(hub_cache().dir, fs::path("/home/u/hf/hub"));
    EXPECT_THAT(hub_cache().from, HasSubstr("HF_HOME"));
    ScopedEnv old("HUGGINGFACE_HUB_CACHE", "/old");
    EXPECT_EQ(hub_cache().dir, fs::path("/old"));
    ScopedEnv root("NANSCOPE_TEST_ROOT", "/r");
    ScopedEnv hub("HF_HUB_CACHE", "${NANSCOPE_TEST_ROOT}/hub/$NANSCOPE_TEST_ROOT/$UNSET_VAR_X");
    EXPECT_EQ(hub_cache().dir, fs::path("/r/hub//r/$UNSET_VAR_X"));
    EXPECT_THAT(hub_cache().from, HasSubstr("HF_HUB_CACHE"));
  }
}

TEST(HubResolve, RefsAndCommitsNameSnapshots) {
  TempDir d;
  const fs::path cache = d.path / "hub";
  const auto main = add_snapshot(cache, "Org/Tiny", fake_commit('a'), fixture("models/qwen3-tiny"));
  const auto v1 = add_snapshot(cache, "Org/Tiny", fake_commit('b'), fixture("models/qwen3-tiny"));
  add_ref(cache, "Org/Tiny", "main", fake_commit('a'));
  add_ref(cache, "Org/Tiny", "v1", fake_commit('b'));
  add_ref(cache, "Org/Tiny", "refs/pr/1", fake_commit('b'));
  const HubCache c{cache, "test"};
  EXPECT_EQ(resolve_hub_snapshot(*parse_hub_id("Org/Tiny"), c), main);
  EXPECT_EQ(resolve_hub_snapshot(*parse_hub_id("Org/Tiny@v1"), c), v1);
  EXPECT_EQ(resolve_hub_snapshot(*parse_hub_id("Org/Tiny@refs/pr/1"), c), v1);
  // A commit hash names its snapshot without a ref.
  const auto c3 = add_snapshot(cache, "Org/Tiny", fake_commit('c'), fixture("models/qwen3-tiny"));
  EXPECT_EQ(resolve_hub_snapshot(*parse_hub_id("Org/Tiny@" + fake_commit('c')), c), c3);
  // The files are symlinks into blobs/, and read through.
  EXPECT_TRUE(fs::is_symlink(main / "model.safetensors"));
  Checkpoint ck = Checkpoint::open(main);
  EXPECT_EQ(ck.config().model_type, "qwen3");
  // A name without an organisation: models--gpt2.
  const auto g = add_snapshot(cache, "gpt2", fake_commit('d'), fixture("models/qwen3-tiny"));
  add_ref(cache, "gpt2", "main", fake_commit('d'));
  EXPECT_EQ(resolve_hub_snapshot(*parse_hub_id("gpt2"), c), g);
  EXPECT_TRUE(fs::is_directory(cache / "models--gpt2"));
}

TEST(HubResolve, MissingThingsSayWhereTheyLookedAndHowToDownload) {
  TempDir d;
  const fs::path cache = d.path / "hub";
  add_snapshot(cache, "Org/Tiny", fake_commit('a'), fixture("models/qwen3-tiny"));
  add_ref(cache, "Org/Tiny", "main", fake_commit('a'));
  const HubCache c{cache, "HF_HUB_CACHE=" + cache.string()};

  auto e = error_of([&] { resolve_hub_snapshot(*parse_hub_id("Org/Missing"), c); });
  EXPECT_EQ(e.kind(), "not_found");
  EXPECT_THAT(e.what(), HasSubstr((cache / "models--Org--Missing").string()));
  EXPECT_THAT(e.what(), HasSubstr("hf download Org/Missing"));
  EXPECT_THAT(e.what(), HasSubstr("huggingface-cli download Org/Missing"));
  EXPECT_THAT(e.what(), HasSubstr("HF_HUB_CACHE="));
  EXPECT_EQ(e.file(), (cache / "models--Org--Missing").string());

  e = error_of([&] { resolve_hub_snapshot(*parse_hub_id("Org/Tiny@v2"), c); });
  EXPECT_EQ(e.kind(), "not_found");
  EXPECT_THAT(e.what(), HasSubstr("revision v2"));
  EXPECT_THAT(e.what(), HasSubstr("refs/v2"));
  EXPECT_THAT(e.what(), HasSubstr("main -> aaaaaaaaaaaa"));  // what is cached
  EXPECT_THAT(e.what(), HasSubstr("hf download Org/Tiny --revision v2"));

  add_ref(cache, "Org/Tiny", "v3", fake_commit('e'));  // a ref to a snapshot not there
  e = error_of([&] { resolve_hub_snapshot(*parse_hub_id("Org/Tiny@v3"), c); });
  EXPECT_THAT(e.what(), HasSubstr("no snapshot " + fake_commit('e')));
  EXPECT_THAT(e.what(), HasSubstr("did not finish"));

  e = error_of([&] { resolve_hub_snapshot(*parse_hub_id("Org/Tiny@" + fake_commit('f')), c); });
  EXPECT_THAT(e.what(), HasSubstr("no snapshot " + fake_commit('f')));

  e = error_of([&] { resolve_hub_snapshot(*parse_hub_id("Org/Tiny@../../x"), c); });
  EXPECT_THAT(e.what(), HasSubstr("not a branch, tag or commit"));

  // A blob that never arrived: the snapshot's symlink dangles, and the message says so.
  const fs::path snap = cache / "models--Org--Tiny" / "snapshots" / fake_commit('a');
  fs::remove(cache / "models--Org--Tiny" / "blobs" /
             (fake_commit('a').substr(0, 8) + "-config.json"));
  e = error_of([&] { Checkpoint::open(snap); });
  EXPECT_THAT(e.what(), HasSubstr("config.json is missing"));
  EXPECT_THAT(e.what(), HasSubstr("a symlink to"));
}

TEST(HubResolve, ModelPathPrefersAnExistingPath) {
  CleanHubEnv clean;
  TempDir d;
  const fs::path cache = d.path / "hub";
  const auto snap = add_snapshot(cache, "Org/Tiny", fake_commit('a'), fixture("models/qwen3-tiny"));
  add_ref(cache, "Org/Tiny", "main", fake_commit('a'));
  ScopedEnv hub("HF_HUB_CACHE", cache.string());
  EXPECT_EQ(resolve_model_path("Org/Tiny"), snap);
  EXPECT_EQ(resolve_model_path(fixture("models/qwen3-tiny")),
            fs::path(fixture("models/qwen3-tiny")));
  // A local directory named like the id wins, as in transformers.
  const fs::path cwd = fs::current_path();
  fs::create_directories(d.path / "work" / "Org" / "Tiny");
  fs::current_path(d.path / "work");
  EXPECT_EQ(resolve_model_path("Org/Tiny"), fs::path("Org/Tiny"));
  fs::current_path(cwd);
  // Neither a path nor a valid id: "no such file or directory".
  auto e = error_of([&] { resolve_model_path("./not/here/at/all"); });
  EXPECT_EQ(e.kind(), "not_found");
  EXPECT_THAT(e.what(), HasSubstr("./not/here/at/all: no such file or directory"));
  // HF_HOME names the cache when HF_HUB_CACHE is not set.
  ScopedEnv unset("HF_HUB_CACHE", std::nullopt);
  ScopedEnv home("HF_HOME", d.path.string());
  fs::rename(cache, d.path / "hub-moved");
  add_snapshot(d.path / "hub", "Org/Other", fake_commit('b'), fixture("models/qwen3-tiny"));
  add_ref(d.path / "hub", "Org/Other", "main", fake_commit('b'));
  EXPECT_EQ(resolve_model_path("Org/Other"),
            d.path / "hub" / "models--Org--Other" / "snapshots" / fake_commit('b'));
}
