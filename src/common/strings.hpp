// Small string helpers shared by the parsers of flags and names.
#pragma once

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

}  // namespace nanscope
