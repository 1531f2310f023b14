// libFuzzer target: config.json as load_model_config reads it. The only expected failure is
// InputError (a parse error becomes one in read_json_file); any other exception, crash or
// sanitizer report is a bug.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "common/error.hpp"
#include "formats/hf_config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const nanscope::ModelConfig c =
        nanscope::parse_model_config(nanscope::parse_json_text(text, "config.json"), "config.json");
    (void)c;
  } catch (const nanscope::InputError&) {
  }
  return 0;
}
