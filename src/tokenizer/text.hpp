// Text helpers for the byte-level BPE tokenizer: strict UTF-8 decoding, lossy repair for decoded
// bytes, NFC, the GPT-2 byte <-> printable code point table, and the Unicode predicates that the
// Hugging Face added-token flags (lstrip / rstrip / single_word) rely on.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace nanscope::text {

inline constexpr size_t kValid = static_cast<size_t>(-1);

// Byte offset of the first byte that does not start a well-formed UTF-8 sequence (overlongs,
// surrogates and code points past U+10FFFF are ill-formed), or kValid.
size_t find_invalid_utf8(std::string_view s);

// Decodes the code point starting at s[i] and advances i. s must be valid UTF-8.
char32_t next_code_point(std::string_view s, size_t& i);

void append_utf8(std::string& out, char32_t cp);

// Bytes -> valid UTF-8, each maximal ill-formed subpart replaced by one U+FFFD (the Unicode
// recommended practice, which is what Rust's String::from_utf8_lossy does).
std::string utf8_lossy(std::string_view bytes);

// NFC of valid UTF-8 as the tokenizers library computes it: utf8proc's NFC, except that code
// points newer than the library's Unicode 9.0 tables are left alone (unicode_tables.hpp).
std::string nfc(std::string_view s);

// Unicode White_Space (what Rust's char::is_whitespace and `\s` mean).
bool is_white_space(char32_t cp);

// Rust regex `\w`: letters, marks, decimal digits, connector punctuation, join controls.
bool is_word_char(char32_t cp);

// GPT-2's reversible map from bytes to printable code points: printable Latin-1 bytes map to
// themselves, the other 68 to U+0100.. in byte order, so every byte is one visible character.
const std::array<char32_t, 256>& byte_to_char();

// Inverse of byte_to_char(): the byte for a code point, or -1 when cp is not in the table.
int char_to_byte(char32_t cp);

}  // namespace nanscope::text
