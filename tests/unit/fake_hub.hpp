// A Hugging Face hub cache laid out by hand the way huggingface_hub writes it:
//   CACHE/models--Org--Name/blobs/<blob>            the files' bytes
//   CACHE/models--Org--Name/snapshots/<commit>/F    symlinks ../../blobs/<blob>
//   CACHE/models--Org--Name/refs/<revision>         the commit hash, no newline
#pragma once

#include <filesystem>
#include <fstream>
#include <string>

namespace nanscope::testing {

// A 40-hex commit hash made from a seed character ('a' -> "aaaa...").
inline std::string fake_commit(char c) {
  return std::string(40, c);
}

// Copies every file of `from` into the cache as snapshot `commit` of `repo_id` (blobs named
// after the commit and the file, as stand-ins for their hashes).
inline std::filesystem::path add_snapshot(const std::filesystem::path& cache,
                                          const std::string& repo_id, const std::string& commit,
                                          const std::filesystem::path& from) {
  namespace fs = std::filesystem;
  std::string folder = "models--" + repo_id;
  for (size_t i = 0; (i = folder.find('/', i)) != std::string::npos;) folder.replace(i, 1, "--");
  const fs::path repo = cache / folder;
  const fs::path snap = repo / "snapshots" / commit;
  fs::create_directories(repo / "blobs");
  fs::create_directories(snap);
  for (const auto& e : fs::directory_iterator(from)) {
    if (!e.is_regular_file()) continue;
    const std::string blob = commit.substr(0, 8) + "-" + e.path().filename().string();
    fs::copy_file(e.path(), repo / "blobs" / blob, fs::copy_options::overwrite_existing);
    fs::create_symlink(fs::path("..") / ".." / "blobs" / blob, snap / e.path().filename());
  }
  return snap;
}

inline void add_ref(const std::filesystem::path& cache, const std::string& repo_id,
                    const std::string& revision, const std::string& commit) {
  namespace fs = std::filesystem;
  std::string folder = "models--" + repo_id;
  for (size_t i = 0; (i = folder.find('/', i)) != std::string::npos;) folder.replace(i, 1, "--");
  const fs::path ref = cache / folder / "refs" / revision;
  fs::create_directories(ref.parent_path());
  std::ofstream(ref, std::ios::binary) << commit;
}

}  // namespace nanscope::testing
