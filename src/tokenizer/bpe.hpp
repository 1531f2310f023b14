// Byte-level BPE tokenizer read from a Hugging Face tokenizer.json (Qwen2 / Qwen3, Llama-3,
// GPT-2 shapes). encode() gives exactly the ids of the `tokenizers` library's
// `Tokenizer.encode(text, add_special_tokens=False).ids`; docs/tokenizer.md lists what is
// supported and how it is checked against goldens from the real library.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace nanscope {

class Tokenizer {
 public:
  // A tokenizer.json file, or a model directory holding one. Throws InputError naming the file
  // for a missing / unreadable file, invalid JSON, or a component this tokenizer does not
  // implement (the message names its type, e.g. "model type 'WordPiece'").
  static Tokenizer load(const std::filesystem::path& tokenizer_json_or_model_dir);

  // Same from the JSON text itself; `source` names it in error messages.
  static Tokenizer from_json(std::string_view json_text, std::string_view source = "<memory>");

  // Token ids of `text` (UTF-8). Added tokens (<|im_start|>, <think>, ...) found in the raw text
  // are single ids and never split. With add_special_tokens the tokenizer.json post-processor
  // runs too (a TemplateProcessing one, as in Meta's Llama-3 files, prepends <|begin_of_text|>;
  // Qwen's adds nothing). Throws InputError when `text` is not valid UTF-8 (the message gives
  // the byte offset).
  // Thread-safe: concurrent calls on one Tokenizer are fine.
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = false) const;

  // Encodes each text on up to `threads` threads (0: hardware concurrency).
  std::vector<std::vector<int32_t>> encode_batch(std::span<const std::string> texts,
                                                 unsigned threads = 0) const;

  // The text of the ids: bytes of the tokens joined, invalid UTF-8 (a multi-byte character cut
  // between ids) replaced by U+FFFD as the `tokenizers` library does. Special added tokens are
  // left out with skip_special_tokens. Throws InputError for an id outside [0, vocab_size()).
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  // One past the highest id (model vocabulary and added tokens): the embedding rows it needs.
  size_t vocab_size() const;

  // Id of a token given in its vocabulary spelling ("Ġworld", "<|im_end|>"); added tokens first.
  std::optional<int32_t> token_to_id(std::string_view token) const;

  // Vocabulary spelling of an id, or nullopt for an id that names no token.
  std::optional<std::string> id_to_token(int32_t id) const;

  // Whether the id is an added token marked "special" (skipped by decode(..., true)).
  bool is_special(int32_t id) const;

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace nanscope
