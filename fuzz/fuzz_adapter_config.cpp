// libFuzzer target: adapter_config.json as Adapter::open reads it (ordered, so that the order of
// rank_pattern keys is kept), then the questions a merge asks of every module name. The only
// expected failure is InputError; anything else is a bug.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/error.hpp"
#include "formats/adapter.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const nanscope::AdapterConfig c =
        nanscope::parse_adapter_config_text(text, "adapter_config.json");
    for (const char* m : {"model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj",
                          "model.embed_tokens", "lm_head"}) {
      (void)nanscope::is_targeted(c, m);
      (void)nanscope::lora_scale_for(c, m);
    }
  } catch (const nanscope::InputError&) {
  }
  return 0;
}
