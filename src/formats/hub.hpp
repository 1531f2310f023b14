// Hugging Face hub ids (`Qwen/Qwen3-4B`, `Qwen/Qwen3-4B@v1.0`) resolved offline from the local
// cache, as huggingface_hub resolves them for transformers' from_pretrained(...,
// local_files_only=True): the cache is HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE (the old
// name), else HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub
// (each with ~ and $VARS expanded); the repository is `models--Org--Name`; a revision (default
// `main`) is read from `refs/<revision>`, except a 40-hex commit hash, which names
// `snapshots/<hash>/` directly. The snapshot's files are symlinks into `blobs/`, read through.
// Nothing is downloaded and nothing in the cache is written.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

namespace nanscope {

struct HubId {
  std::string repo_id;            // "Qwen/Qwen3-4B" or "gpt2"
  std::string revision = "main";  // a branch, a tag or a commit hash
};

// "Org/Name" or "Name", optionally "@revision", with huggingface_hub's rules for a repo id
// (validate_repo_id: letters, digits, '-', '_', '.', at most 96 characters for the name, no
// "--" or "..", not starting or ending with '-' or '.'). nullopt for anything else.
std::optional<HubId> parse_hub_id(std::string_view s);

struct HubCache {
  std::filesystem::path dir;
  std::string from;  // how it was chosen: "HF_HUB_CACHE=...", "HF_HOME=...", "the default"
};
// The cache directory from the environment, as huggingface_hub.constants computes it.
HubCache hub_cache();

// The snapshot directory of `id` in `cache`. Throws InputError (kind not_found, naming what is
// missing, where it looked and the command that downloads it) when the repository, the
// revision or the snapshot is not there.
std::filesystem::path resolve_hub_snapshot(const HubId& id, const HubCache& cache);

// What every command does with MODEL, --base and --adapter (and Python with its paths): a path
// that exists is used as given (a local directory wins over a hub id, as in transformers); else
// a hub id is resolved with resolve_hub_snapshot(hub_cache()); else an InputError of kind
// not_found: "ARG: no such file or directory" (and for a hub id, where it looked).
std::filesystem::path resolve_model_path(const std::string& arg);

// For a file that fs::exists calls missing: when it is a symlink whose target is gone (a blob of
// the hub cache not downloaded whole), " (a symlink to TARGET, which is missing: ...)", else "".
std::string dangling_link_note(const std::filesystem::path& p);

}  // namespace nanscope
