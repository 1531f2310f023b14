#include "tokenizer/regex.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "common/error.hpp"
#include "tokenizer/unicode_tables.hpp"

namespace nanscope {
namespace {

// Unicode White_Space, written for a PCRE2 character class.
constexpr std::string_view kWhiteSpace =
    "\\t-\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}"
    "\\x{205F}\\x{3000}";

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof buf);
  return reinterpret_cast<const char*>(buf);
}

// The JIT needs its own stack; deep backtracking (long whitespace runs under `\s+(?!\S)`) can
// outgrow the 32 KiB default, so each thread gets one that may grow to 8 MiB.
pcre2_jit_stack* thread_jit_stack(void*) {
  struct Holder {
    pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
    ~Holder() { pcre2_jit_stack_free(stack); }
  };
  thread_local Holder holder;
  return holder.stack;
}

pcre2_match_data* thread_match_data() {
  struct Holder {
    pcre2_match_data* data = pcre2_match_data_create(32, nullptr);
    ~Holder() { pcre2_match_data_free(data); }
  };
  thread_local Holder holder;
  return holder.data;
}

}  // namespace

struct SplitRegex::Impl {
  pcre2_code* code = nullptr;
  pcre2_match_context* context = nullptr;
  ~Impl() {
    pcre2_match_context_free(context);
    pcre2_code_free(code);
  }
};

std::string SplitRegex::onig_compatible(std::string_view p) {
  using unicode_tables::Range;
  // Class members (no brackets) for a property with Oniguruma's extra code points added.
  auto members = [](std::string_view property, const std::vector<Range>& extra) {
    std::string m(property);
    for (const Range& r : extra) {
      m += fmt::format("\\x{{{:X}}}", static_cast<uint32_t>(r.lo));
      if (r.hi != r.lo) m += fmt::format("-\\x{{{:X}}}", static_cast<uint32_t>(r.hi));
    }
    return m;
  };
  const std::string letters = members("\\p{L}", unicode_tables::kLExtra);
  const std::string numbers = members("\\p{N}", unicode_tables::kNExtra);

  std::string out;
  out.reserve(p.size() + letters.size() + numbers.size());
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const std::string_view rest = p.substr(i);
      const std::string* property = rest.starts_with("\\p{L}")   ? &letters
                                    : rest.starts_with("\\p{N}") ? &numbers
                                                                 : nullptr;
      if (property != nullptr) {
        out.append(in_class ? *property : "[" + *property + "]");
        i += 4;
        continue;
      }
      const char e = p[i + 1];
      if (e == 's') {
        out.append(in_class ? std::string(kWhiteSpace) : fmt::format("[{}]", kWhiteSpace));
      } else if (e == 'S' && !in_class) {
        out.append(fmt::format("[^{}]", kWhiteSpace));
      } else {
        // `\S`, `\P{L}` inside a class and other escapes stay PCRE2's; they differ only on code
        // points that tokenizer.json patterns do not use.
        out.push_back(c);
        out.push_back(e);
      }
      ++i;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out.push_back(c);
      // A `]` right after `[` or `[^` is a literal, not the end of the class.
      if (i + 1 < p.size() && p[i + 1] == '^') out.push_back(p[++i]);
      if (i + 1 < p.size() && p[i + 1] == ']') out.push_back(p[++i]);
      continue;
    }
    if (in_class && c == ']') in_class = false;
    out.push_back(c);
  }
  return out;
}

SplitRegex::SplitRegex(const std::string& pattern, bool literal, std::string_view source)
    : impl_(std::make_unique<Impl>()) {
  const std::string translated = literal ? pattern : onig_compatible(pattern);
  int error = 0;
  PCRE2_SIZE offset = 0;
  uint32_t options = PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK;
  if (literal) options |= PCRE2_LITERAL;
  impl_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(),
                              options, &error, &offset, nullptr);
  if (impl_->code == nullptr) {
    fail("tokenizer: {}: the pre-tokenizer regex /{}/ does not compile at offset {}: {}", source,
         pattern, offset, pcre2_message(error));
  }
  // Without JIT (unsupported CPU) the interpreter gives the same matches, only slower.
  pcre2_jit_compile(impl_->code, PCRE2_JIT_COMPLETE);
  impl_->context = pcre2_match_context_create(nullptr);
  pcre2_jit_stack_assign(impl_->context, &thread_jit_stack, nullptr);
}

SplitRegex::~SplitRegex() = default;
SplitRegex::SplitRegex(SplitRegex&&) noexcept = default;
SplitRegex& SplitRegex::operator=(SplitRegex&&) noexcept = default;

void SplitRegex::find_all(std::string_view subject,
                          std::vector<std::pair<size_t, size_t>>& out) const {
  out.clear();
  pcre2_match_data* md = thread_match_data();
  const auto* data = reinterpret_cast<PCRE2_SPTR>(subject.data());
  size_t start = 0;
  while (start <= subject.size()) {
    const int rc = pcre2_match(impl_->code, data, subject.size(), start, PCRE2_NO_UTF_CHECK, md,
                               impl_->context);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    // rc == 0 only means the ovector was too small for the groups; the whole match is still set.
    if (rc < 0) fail("tokenizer: the pre-tokenizer regex failed: {}", pcre2_message(rc));
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    if (ov[1] > ov[0]) {
      out.emplace_back(ov[0], ov[1]);
      start = ov[1];
    } else {
      // Empty match: step over one code point, as find-iter does.
      if (ov[0] >= subject.size()) break;
      start = ov[0] + 1;
      while (start < subject.size() &&
             (static_cast<unsigned char>(subject[start]) & 0xC0) == 0x80) {
        ++start;
      }
    }
  }
}

}  // namespace nanscope
