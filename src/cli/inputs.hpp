// What the subcommands share in reading their arguments: MODEL / --base / --adapter as a path or
// a Hugging Face hub id, comma-separated lists, token inputs (--ids 1,2,3 or --text STR, tokenized
// with the model's tokenizer.json or --tokenizer FILE), dtypes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/forward.hpp"
#include "numerics/dtype.hpp"

namespace nanscope::cli {

// MODEL, --base, --adapter, tokenize's SOURCE: the path as given when it exists, else the
// snapshot of a hub id in the local cache (formats/hub.hpp), said on stderr; else an InputError
// of kind not_found.
std::string model_path(const std::string& arg);

// "a, b,c" -> {"a", "b", "c"}; an empty item ("a,,b", "a,", "") is a usage error naming `flag`.
std::vector<std::string> split_list(const std::string& flag, const std::string& s);

std::vector<int64_t> parse_ids(const std::string& s);  // "1,2, 3" or "[1, 2, 3]"; InputError if bad

// Exactly one of ids / text may be set; with neither, an InputError says what to pass.
std::vector<int64_t> resolve_tokens(const std::string& model_dir, const std::string& ids,
                                    const std::string& text, const std::string& tokenizer);

// A run dtype from the one spelling table (parse_float_dtype); `auto` (where allowed) is the
// checkpoint's: config.json's dtype, else the dtype its tensors are stored in.
// --attention: eager, or fused also spelled sdpa; else a usage error (`more`: " or both").
AttentionProfile parse_attention_flag(const std::string& s, const std::string& more = "");

DType parse_run_dtype_flag(const std::string& flag, const std::string& s,
                           const std::string& model_dir = "");

}  // namespace nanscope::cli
