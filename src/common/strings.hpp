// Small string helpers shared by the parsers of flags and names.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace nanscope {

// ASCII lower case (the spellings users type: dtypes, attention profiles, `auto`).
inline std::string ascii_lower(std::string_view s) {
  std::string out(s);
  for (char& c : out)
    if (c >= 'A' && c <= 'Z') c = char(c - 'A' + 'a');
  return out;
}

// A size as users type it: a positive number and a unit, "5GB", "500MiB", "4G", "1.5GiB",
// "8192" (bytes). Decimal units (KB, MB, GB, TB) are powers of 1000; the binary ones (KiB, MiB,
// GiB, TiB) and the bare letters (K, M, G, T, as `free -h` and Slurm print them) powers of
// 1024; case is ignored. nullopt for anything else, for zero and for sizes past 2^63.
inline std::optional<uint64_t> parse_byte_size(std::string_view s) {
  size_t i = 0;
  double v = 0;
  bool digits = false;
  for (; i < s.size() && s[i] >= '0' && s[i] <= '9'; ++i, digits = true) v = v * 10 + (s[i] - '0');
  if (i < s.size() && s[i] == '.') {
    double scale = 0.1;
    for (++i; i < s.size() && s[i] >= '0' && s[i] <= '9'; ++i, digits = true, scale /= 10)
      v += (s[i] - '0') * scale;
  }
  if (!digits) return std::nullopt;
  while (i < s.size() && s[i] == ' ') ++i;
  const std::string unit = ascii_lower(s.substr(i));
  double mul = 0;
  if (unit.empty() || unit == "b") mul = 1;
  const char* const letters = "kmgt";
  for (int p = 0; p < 4; ++p) {
    const std::string l(1, letters[p]);
    if (unit == l || unit == l + "ib") mul = std::pow(1024.0, p + 1);
    if (unit == l + "b") mul = std::pow(1000.0, p + 1);
  }
  const double bytes = std::floor(v * mul);
  if (mul == 0 || !(bytes >= 1) || bytes >= 9.2e18) return std::nullopt;
  return uint64_t(bytes);
}

}  // namespace nanscope
