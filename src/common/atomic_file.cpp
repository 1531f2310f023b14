#include "common/atomic_file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "common/error.hpp"

namespace nanscope {

void write_file_atomic(const std::filesystem::path& path, std::string_view content, bool durable) {
  const std::string tmp = register_new_temporary(path).string();
  // Unregistered once renamed into place or removed, whichever way this function leaves.
  struct Unregister {
    const std::string& p;
    ~Unregister() { unregister_temporary(p); }
  } unregister{tmp};
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw OutputError(fmt::format("{}: {}", path.string(), std::strerror(errno)));
  size_t done = 0;
  while (done < content.size()) {
    ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int e = n < 0 ? errno : ENOSPC;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw OutputError(fmt::format("{}: {}", path.string(), std::strerror(e)));
    }
    done += size_t(n);
  }
  if ((durable && ::fsync(fd) != 0) || ::close(fd) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    throw OutputError(fmt::format("{}: {}", path.string(), std::strerror(e)));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    throw OutputError(fmt::format("{}: {}", path.string(), std::strerror(e)));
  }
}

void check_writable(const std::filesystem::path& path, std::string_view flag) {
  namespace fs = std::filesystem;
  auto no = [&](const std::string& why) {
    throw OutputError(fmt::format("{} {}: {}", flag, path.string(), why));
  };
  std::error_code ec;
  if (path.empty()) no("empty path");
  if (fs::is_directory(path, ec)) no("is a directory; give a file name");
  const fs::path dir = path.has_parent_path() ? path.parent_path() : fs::path(".");
  if (!fs::exists(dir, ec)) no(fmt::format("directory {} does not exist", dir.string()));
  if (!fs::is_directory(dir, ec)) no(fmt::format("{} is not a directory", dir.string()));
  // The real test: what write_file_atomic will do (a temporary beside it), done now and undone.
  const fs::path probe = temporary_path(path);
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    if (errno == EEXIST) return;  // a temporary of this process already there: writable
    no(fmt::format("cannot create a file in {}: {}", dir.string(), std::strerror(errno)));
  }
  ::close(fd);
  ::unlink(probe.c_str());
}

void fsync_path(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0 || ::fsync(fd) != 0) {
    const int e = errno;
    if (fd >= 0) ::close(fd);
    throw OutputError(fmt::format("{}: fsync failed: {}", path.string(), std::strerror(e)));
  }
  ::close(fd);
}

void fsync_dir_quietly(const std::filesystem::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

}  // namespace nanscope
