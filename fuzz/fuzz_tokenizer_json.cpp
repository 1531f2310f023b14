// libFuzzer target: tokenizer.json as Tokenizer::load reads it, then one encode and decode.
// Input: the file's bytes, then optionally a NUL byte and a text to encode. The only expected
// failure is InputError (bad file, text that is not UTF-8); anything else is a bug.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "common/error.hpp"
#include "tokenizer/bpe.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view all(reinterpret_cast<const char*>(data), size);
  const size_t nul = all.find('\0');
  const std::string_view file = all.substr(0, nul);
  const std::string_view text =
      nul == std::string_view::npos ? "Hello, world! 123" : all.substr(nul + 1);
  try {
    const nanscope::Tokenizer t = nanscope::Tokenizer::from_json(file, "tokenizer.json");
    for (bool special : {false, true}) {
      try {
        const std::vector<int32_t> ids = t.encode(text, special);
        (void)t.decode(ids, true);
      } catch (const nanscope::InputError&) {
      }
    }
  } catch (const nanscope::InputError&) {
  }
  return 0;
}
