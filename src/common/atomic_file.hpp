// Small text outputs (reports, JSON side files) written whole or not at all: to a temporary
// name beside the target, fsynced, renamed into place; and the fsyncs of other writers.
#pragma once

#include <filesystem>
#include <string_view>

#include "common/temp_files.hpp"  // the temporaries these writes (and merge's) use

namespace nanscope {

// Throws OutputError naming the path when the file cannot be written (full disk, permissions).
// durable = false skips the fsync (the bytes are left to the kernel's writeback).
void write_file_atomic(const std::filesystem::path& path, std::string_view content,
                       bool durable = true);

// Before a long computation whose result goes to `path`: fails at once (OutputError naming the
// flag and the path) when the file could not be written later, because its directory is missing
// or not writable, or the path is a directory. Creates and removes a temporary there to be sure.
void check_writable(const std::filesystem::path& path, std::string_view flag);

// fsync of a written file or directory; OutputError naming it on failure.
void fsync_path(const std::filesystem::path& path);
// fsync of a directory after a rename into it, where failing leaves the renamed file complete
// (so not an error): errors are ignored.
void fsync_dir_quietly(const std::filesystem::path& dir);

}  // namespace nanscope
