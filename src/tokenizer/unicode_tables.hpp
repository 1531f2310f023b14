// Where the Hugging Face tokenizers library's Unicode data differs from utf8proc's and PCRE2's,
// measured on the library by gen_unicode_tables.py (which writes unicode_tables.cpp).
#pragma once

#include <vector>

namespace nanscope::unicode_tables {

struct Range {
  char32_t lo, hi;  // inclusive
};

// Oniguruma (the library's regex engine) has newer Unicode than PCRE2 10.42: these code points
// are in its \p{L} / \p{N} / \s and not in PCRE2's ("Extra"), or the other way ("Missing").
extern const std::vector<Range> kLExtra, kLMissing, kNExtra, kNMissing, kSExtra, kSMissing;

// Code points the library's NFC (Unicode 9.0 tables) does not reorder, decompose or compose
// but utf8proc's (Unicode 15) does: marks and parts of scripts encoded after Unicode 9.0.
extern const std::vector<Range> kNfcInert;

}  // namespace nanscope::unicode_tables
