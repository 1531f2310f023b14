// Small text outputs (reports, JSON side files) written whole or not at all: to a temporary
// name beside the target, fsynced, renamed into place.
#pragma once

#include <filesystem>
#include <string_view>

namespace nanscope {

// Throws OutputError naming the path when the file cannot be written (full disk, permissions).
void write_file_atomic(const std::filesystem::path& path, std::string_view content);

}  // namespace nanscope
