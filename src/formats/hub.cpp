#include "formats/hub.hpp"

#include <pwd.h>
#include <unistd.h>

#include <cctype>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <system_error>
#include <vector>

#include "common/error.hpp"

namespace nanscope {

namespace fs = std::filesystem;

namespace {

bool word_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
}

// One part of REPO_ID_REGEX: [\w\-.]{1,max}, first and last characters \w (the \b around it).
bool repo_part(std::string_view p, size_t max) {
  if (p.empty() || p.size() > max || !word_char(p.front()) || !word_char(p.back())) return false;
  for (char c : p)
    if (!word_char(c) && c != '-' && c != '.') return false;
  return true;
}

const char* env(const char* name) {
  return std::getenv(name);
}

// posixpath.expanduser: "~" and "~/x" from $HOME (else the passwd entry), "~user/x" from user's
// passwd entry; anything else, or an unknown user, unchanged.
std::string expand_user(const std::string& p) {
  if (p.empty() || p[0] != '~') return p;
  const size_t slash = p.find('/', 1);
  const size_t i = slash == std::string::npos ? p.size() : slash;
  std::string home;
  if (i == 1) {
    if (const char* h = env("HOME")) {
      home = h;
    } else if (const passwd* pw = ::getpwuid(::getuid())) {
      home = pw->pw_dir;
    } else {
      return p;
    }
  } else {
    const passwd* pw = ::getpwnam(p.substr(1, i - 1).c_str());
    if (!pw) return p;
    home = pw->pw_dir;
  }
  while (!home.empty() && home.back() == '/') home.pop_back();
  std::string out = home + p.substr(i);
  return out.empty() ? "/" : out;
}

// posixpath.expandvars: $NAME and ${NAME} of variables that are set; the rest left as written.
std::string expand_vars(const std::string& p) {
  std::string out;
  for (size_t i = 0; i < p.size();) {
    if (p[i] != '$' || i + 1 >= p.size()) {
      out += p[i++];
      continue;
    }
    size_t name_begin = i + 1, name_end, next;
    if (p[i + 1] == '{') {
      const size_t close = p.find('}', i + 2);
      if (close == std::string::npos) {
        out += p[i++];
        continue;
      }
      name_begin = i + 2, name_end = close, next = close + 1;
    } else {
      name_end = name_begin;
      while (name_end < p.size() && word_char(p[name_end])) ++name_end;
      next = name_end;
      if (name_end == name_begin) {
        out += p[i++];
        continue;
      }
    }
    const std::string name = p.substr(name_begin, name_end - name_begin);
    if (const char* v = name.empty() ? nullptr : env(name.c_str())) {
      out += v;
    } else {
      out += p.substr(i, next - i);
    }
    i = next;
  }
  return out;
}

std::string expand(const std::string& p) {
  return expand_vars(expand_user(p));
}

bool commit_hash(std::string_view s) {  // file_download.REGEX_COMMIT_HASH: ^[0-9a-f]{40}$
  if (s.size() != 40) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

std::string download_command(const HubId& id) {
  const std::string rev = id.revision == "main" ? "" : " --revision " + id.revision;
  return fmt::format(
      "`hf download {0}{1}` (older huggingface_hub: `huggingface-cli download "
      "{0}{1}`)",
      id.repo_id, rev);
}

// "main -> 0123abc, v1.0 -> 4567def" for the refs a repository's cache holds.
std::string cached_refs(const fs::path& repo) {
  std::vector<std::string> refs;
  std::error_code ec;
  const fs::path dir = repo / "refs";
  for (auto it = fs::recursive_directory_iterator(dir, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (!it->is_regular_file(ec)) continue;
    std::ifstream in(it->path());
    std::string hash;
    std::getline(in, hash);
    refs.push_back(
        fmt::format("{} -> {}", fs::relative(it->path(), dir, ec).string(), hash.substr(0, 12)));
    if (refs.size() == 8) break;
  }
  if (refs.empty()) return "no refs";
  std::string s;
  for (const auto& r : refs) s += (s.empty() ? "" : ", ") + r;
  return "cached: " + s;
}

}  // namespace

std::optional<HubId> parse_hub_id(std::string_view s) {
  HubId id;
  if (const size_t at = s.find('@'); at != std::string_view::npos) {
    id.revision = std::string(s.substr(at + 1));
    s = s.substr(0, at);
    if (id.revision.empty()) return std::nullopt;
  }
  const size_t slash = s.find('/');
  if (slash != std::string_view::npos) {
    if (s.find('/', slash + 1) != std::string_view::npos) return std::nullopt;
    if (!repo_part(s.substr(0, slash), s.size()) || !repo_part(s.substr(slash + 1), 96))
      return std::nullopt;
  } else if (!repo_part(s, 96)) {
    return std::nullopt;
  }
  if (s.find("--") != std::string_view::npos || s.find("..") != std::string_view::npos ||
      s.ends_with(".git"))
    return std::nullopt;
  id.repo_id = std::string(s);
  return id;
}

HubCache hub_cache() {
  HubCache c;
  if (const char* v = env("HF_HUB_CACHE")) {
    c.dir = expand(v);
    c.from = fmt::format("HF_HUB_CACHE={}", v);
  } else if (const char* old = env("HUGGINGFACE_HUB_CACHE")) {
    c.dir = expand(old);
    c.from = fmt::format("HUGGINGFACE_HUB_CACHE={}", old);
  } else if (const char* home = env("HF_HOME")) {
    c.dir = fs::path(expand(home)) / "hub";
    c.from = fmt::format("HF_HOME={}", home);
  } else if (const char* xdg = env("XDG_CACHE_HOME")) {
    c.dir = fs::path(expand(fs::path(xdg) / "huggingface")) / "hub";
    c.from = fmt::format("XDG_CACHE_HOME={}", xdg);
  } else {
    c.dir = fs::path(expand(fs::path(expand_user("~")) / ".cache" / "huggingface")) / "hub";
    c.from = "the default: HF_HUB_CACHE, HF_HOME and XDG_CACHE_HOME are not set";
  }
  return c;
}

fs::path resolve_hub_snapshot(const HubId& id, const HubCache& cache) {
  std::string folder = "models";
  for (std::string_view rest = id.repo_id;;) {
    const size_t slash = rest.find('/');
    folder += "--" + std::string(rest.substr(0, slash));
    if (slash == std::string_view::npos) break;
    rest = rest.substr(slash + 1);
  }
  const fs::path repo = cache.dir / folder;
  const std::string label = id.repo_id + (id.revision == "main" ? "" : "@" + id.revision);
  std::error_code ec;
  if (!fs::is_directory(repo, ec))
    fail_not_found(repo,
                   "{}: no such file or directory, and not in the Hugging Face cache either: no "
                   "{} (cache {}, from {}). Download it with {}, or point HF_HUB_CACHE or HF_HOME "
                   "at the cache that holds it",
                   label, repo.string(), cache.dir.string(), cache.from, download_command(id));
  // A revision is a ref name (a branch, a tag, refs/pr/N) or a commit; never a way out of the
  // repository's folder.
  for (const auto& part : fs::path(id.revision))
    if (part == ".." || part == ".")
      fail_not_found(repo, "{}: revision {} is not a branch, tag or commit", label, id.revision);
  std::string hash;
  if (commit_hash(id.revision)) {
    hash = id.revision;
  } else {
    const fs::path ref = repo / "refs" / id.revision;
    if (!fs::is_regular_file(ref, ec))
      fail_not_found(ref,
                     "{}: revision {} is not in the Hugging Face cache: no {} ({}). Download it "
                     "with {}, or name a revision that is cached",
                     label, id.revision, ref.string(), cached_refs(repo), download_command(id));
    std::ifstream in(ref, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    hash = ss.str();  // as huggingface_hub reads it: the whole file, no newline stripped
    if (hash.empty() || hash.find('/') != std::string::npos || hash == "." || hash == "..")
      fail_not_found(ref, "{}: {} holds \"{}\", not a commit hash (a damaged cache?)", label,
                     ref.string(), hash);
  }
  const fs::path snapshot = repo / "snapshots" / hash;
  if (!fs::is_directory(snapshot, ec))
    fail_not_found(snapshot,
                   "{}: the Hugging Face cache has no snapshot {}: {} is missing (a download "
                   "that did not finish?). Download it with {}",
                   label, hash, snapshot.string(), download_command(id));
  return snapshot;
}

fs::path resolve_model_path(const std::string& arg) {
  std::error_code ec;
  if (arg.empty() || fs::exists(arg, ec) || fs::is_symlink(arg, ec)) return arg;
  if (auto id = parse_hub_id(arg)) return resolve_hub_snapshot(*id, hub_cache());
  fail_not_found(arg, "{}: no such file or directory", arg);
}

std::string dangling_link_note(const fs::path& p) {
  std::error_code ec;
  if (!fs::is_symlink(p, ec) || fs::exists(p, ec)) return "";
  const fs::path target = fs::read_symlink(p, ec);
  return fmt::format(
      " (a symlink to {}, which is missing: a download into the Hugging Face cache that did not "
      "finish? Download the model again)",
      target.string());
}

}  // namespace nanscope
