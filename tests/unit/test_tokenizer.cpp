// Byte-level BPE tokenizer: ids identical to the Hugging Face `tokenizers` library on the goldens
// it produced (tests/fixtures/tokenizer/goldens.jsonl, made by
// tools/fixtures/make_tokenizer_goldens.py), decode round trips, and one error per way a
// tokenizer.json or an input can be wrong.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "tokenizer/bpe.hpp"
#include "tokenizer/regex.hpp"
#include "tokenizer/text.hpp"

namespace nanscope {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const fs::path kDir = fs::path(NANSCOPE_FIXTURES) / "tokenizer";

const Tokenizer& qwen3() {
  static const Tokenizer tok = Tokenizer::load(kDir / "qwen3");
  return tok;
}

std::vector<json> read_jsonl(const fs::path& path) {
  std::ifstream in(path);
  std::vector<json> rows;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) rows.push_back(json::parse(line));
  }
  return rows;
}

std::vector<std::string> corpus() {
  std::vector<std::string> texts;
  for (const json& row : read_jsonl(kDir / "corpus.jsonl")) texts.push_back(row.at("text"));
  return texts;
}

std::string show_ids(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? ", " : "") + std::to_string(ids[i]);
  return s + "]";
}

// Expects `f` to throw InputError whose message contains every one of `parts`.
template <typename F>
void expect_input_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "no InputError thrown";
  } catch (const InputError& e) {
    for (const std::string& p : parts) {
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos)
          << "message lacks '" << p << "': " << e.what();
    }
  }
}

TEST(TokenizerQwen3, KnownIdsFromReference) {
  // reference-facts.md section 8: the tokenizers library's ids for this string.
  const std::vector<int32_t> ids = qwen3().encode("Hello, world!");
  EXPECT_EQ(ids, (std::vector<int32_t>{9707, 11, 1879, 0}));
  EXPECT_EQ(qwen3().decode(ids), "Hello, world!");
}

TEST(TokenizerQwen3, GoldensFromHuggingFaceTokenizers) {
  // NANSCOPE_TOKENIZER_GOLDENS points at other reference ids in the same format (for example
  // make_tokenizer_goldens.py --random output); then the corpus check is skipped.
  // NANSCOPE_TOKENIZER_JSON names the tokenizer they were made with (default: Qwen3).
  const char* override_path = std::getenv("NANSCOPE_TOKENIZER_GOLDENS");
  const char* override_tokenizer = std::getenv("NANSCOPE_TOKENIZER_JSON");
  std::optional<Tokenizer> other;
  if (override_tokenizer) other.emplace(Tokenizer::load(override_tokenizer));
  const Tokenizer& tok = other ? *other : qwen3();
  const fs::path path = override_path ? fs::path(override_path) : kDir / "goldens.jsonl";
  if (!fs::exists(path)) {
    GTEST_SKIP() << path << " is missing: run tools/fixtures/make_tokenizer_goldens.py with the "
                 << "Python tokenizers library and commit its goldens.jsonl";
  }
  const std::vector<json> rows = read_jsonl(path);
  ASSERT_FALSE(rows.empty()) << path;
  if (!override_path) {
    // Goldens made from an older corpus would silently test less.
    std::set<std::string> golden_texts;
    for (const json& row : rows) golden_texts.insert(row.at("text").get<std::string>());
    for (const std::string& t : corpus()) {
      ASSERT_TRUE(golden_texts.count(t)) << "corpus text without golden ids (regenerate "
                                         << "goldens.jsonl): " << json(t).dump();
    }
  }
  size_t mismatches = 0, decode_mismatches = 0;
  for (const json& row : rows) {
    const std::string text = row.at("text");
    if (row.contains("error")) {
      ADD_FAILURE() << "the reference library failed on " << json(text).dump() << ": "
                    << row["error"];
      continue;
    }
    const std::vector<int32_t> expected = row.at("ids");
    const std::vector<int32_t> got = tok.encode(text);
    if (got != expected && ++mismatches <= 10) {
      ADD_FAILURE() << "text " << json(text).dump() << "\n  expected " << show_ids(expected)
                    << "\n  got      " << show_ids(got);
    }
    // "decoded" is the library's decode(ids): checks decode on the same ids.
    if (row.contains("decoded")) {
      const std::string decoded = tok.decode(expected);
      if (decoded != row["decoded"].get<std::string>() && ++decode_mismatches <= 5) {
        ADD_FAILURE() << "decode of " << show_ids(expected) << "\n  expected "
                      << row["decoded"].dump() << "\n  got      " << json(decoded).dump();
      }
    }
  }
  EXPECT_EQ(mismatches, 0u) << "of " << rows.size() << " goldens from " << path;
  EXPECT_EQ(decode_mismatches, 0u) << "of " << rows.size() << " decodes from " << path;
}

TEST(TokenizerQwen3, DecodeRoundTripsToNfc) {
  size_t failures = 0;
  for (const std::string& text : corpus()) {
    const std::string back = qwen3().decode(qwen3().encode(text));
    if (back != text::nfc(text) && ++failures <= 5) {
      ADD_FAILURE() << "round trip of " << json(text).dump() << " gave " << json(back).dump();
    }
  }
  EXPECT_EQ(failures, 0u);
}

TEST(TokenizerQwen3, AddedTokensAreSingleIdsMatchedOnRawText) {
  const Tokenizer& t = qwen3();
  EXPECT_EQ(t.vocab_size(), 151669u);
  EXPECT_EQ(t.token_to_id("<|im_start|>"), 151644);
  EXPECT_EQ(t.token_to_id("<think>"), 151667);
  EXPECT_EQ(t.token_to_id("Hello"), 9707);
  EXPECT_EQ(t.token_to_id("no such token"), std::nullopt);
  EXPECT_EQ(t.id_to_token(9707), "Hello");
  EXPECT_EQ(t.id_to_token(-1), std::nullopt);
  EXPECT_TRUE(t.is_special(151644));
  EXPECT_FALSE(t.is_special(151667));  // <think> is an added token, not a special one

  const std::vector<int32_t> ids = t.encode("<|im_start|>user<think>x</think><|im_end|>");
  ASSERT_GE(ids.size(), 5u);
  EXPECT_EQ(ids.front(), 151644);
  EXPECT_EQ(ids.back(), 151645);
  EXPECT_EQ(t.decode(ids), "<|im_start|>user<think>x</think><|im_end|>");
  EXPECT_EQ(t.decode(ids, /*skip_special_tokens=*/true), "user<think>x</think>");
  // Qwen's post-processor adds nothing.
  EXPECT_EQ(t.encode("Hello, world!", true), t.encode("Hello, world!"));
}

TEST(TokenizerQwen3, DecodeReplacesCutCharactersAndRejectsUnknownIds) {
  const Tokenizer& t = qwen3();
  // "é" is C3 A9; the single-byte token for C3 alone is not valid UTF-8.
  const auto c3 = t.token_to_id("\xC3\x83");  // byte 0xC3 is shown as U+00C3
  ASSERT_TRUE(c3.has_value());
  const std::vector<int32_t> one{*c3};
  EXPECT_EQ(t.decode(one), "\xEF\xBF\xBD");
  expect_input_error([&] { t.decode(std::vector<int32_t>{151669}); }, {"151669"});
  expect_input_error([&] { t.decode(std::vector<int32_t>{-3}); }, {"-3"});
}

TEST(TokenizerQwen3, InvalidUtf8IsRejectedWithItsOffset) {
  const Tokenizer& t = qwen3();
  expect_input_error([&] { t.encode("ab\xFF"); }, {"UTF-8", "offset 2"});
  expect_input_error([&] { t.encode("abc\xC3"); }, {"offset 3"});           // truncated
  expect_input_error([&] { t.encode("\xC0\xAF"); }, {"offset 0"});          // overlong '/'
  expect_input_error([&] { t.encode("x\xED\xA0\x80"); }, {"offset 1"});     // surrogate
  expect_input_error([&] { t.encode("\xF4\x90\x80\x80"); }, {"offset 0"});  // past U+10FFFF
  EXPECT_NO_THROW(t.encode(std::string("nul \0 inside", 12)));
}

TEST(TokenizerQwen3, BatchMatchesSingleEncodes) {
  std::vector<std::string> texts = corpus();
  texts.resize(std::min<size_t>(texts.size(), 600));
  const auto batch = qwen3().encode_batch(texts, 4);
  ASSERT_EQ(batch.size(), texts.size());
  for (size_t i = 0; i < texts.size(); ++i) EXPECT_EQ(batch[i], qwen3().encode(texts[i])) << i;
}

TEST(TokenizerQwen3, LoadsFromFileOrDirectory) {
  const Tokenizer from_file = Tokenizer::load(kDir / "qwen3" / "tokenizer.json");
  EXPECT_EQ(from_file.encode("Hello, world!"), qwen3().encode("Hello, world!"));
}

// A tiny byte-level tokenizer: the 256 byte characters (ids 0..255) plus whatever a test adds.
json tiny(json merges, json extra_vocab = json::object(), json added = json::array()) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) {
    std::string s;
    text::append_utf8(s, text::byte_to_char()[b]);
    vocab[s] = b;
  }
  for (auto& [k, v] : extra_vocab.items()) vocab[k] = v;
  return json{
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}},
  };
}

std::vector<int32_t> ids_of(const json& j, std::string_view text) {
  return Tokenizer::from_json(j.dump(), "tiny").encode(text);
}

TEST(TokenizerBpe, MergesAsStringsOrPairsLowestRankLeftmostFirst) {
  const json vocab = {{"ab", 256}, {"abc", 257}, {"aa", 258}};
  const json strings = json::array({"a b", "ab c", "a a"});
  const json pairs = json::array({{"a", "b"}, {"ab", "c"}, {"a", "a"}});
  EXPECT_EQ(ids_of(tiny(strings, vocab), "abc"), (std::vector<int32_t>{257}));
  EXPECT_EQ(ids_of(tiny(pairs, vocab), "abc"), (std::vector<int32_t>{257}));
  // Ties go to the leftmost pair: "aaa" -> "aa" + "a".
  EXPECT_EQ(ids_of(tiny(pairs, vocab), "aaa"), (std::vector<int32_t>{258, 'a'}));
  // "a b" (rank 0) beats "a a" (rank 2): "aab" -> "a" + "ab".
  EXPECT_EQ(ids_of(tiny(pairs, vocab), "aab"), (std::vector<int32_t>{'a', 256}));
}

TEST(TokenizerBpe, IgnoreMergesTakesWholeWordsFromTheVocabulary) {
  json j = tiny(json::array({"a b"}), {{"ab", 256}, {"xyz", 300}});
  EXPECT_EQ(ids_of(j, "xyz"), (std::vector<int32_t>{'x', 'y', 'z'}));
  j["model"]["ignore_merges"] = true;
  EXPECT_EQ(ids_of(j, "xyz"), (std::vector<int32_t>{300}));
  EXPECT_EQ(ids_of(j, "ab"), (std::vector<int32_t>{256}));
}

TEST(TokenizerBpe, AddedTokenFlags) {
  const json added = json::array({
      {{"id", 400},
       {"content", "<m>"},
       {"lstrip", true},
       {"rstrip", true},
       {"special", true},
       {"normalized", false},
       {"single_word", false}},
      {{"id", 401},
       {"content", "<w>"},
       {"single_word", true},
       {"special", false},
       {"normalized", false}},
      {{"id", 402}, {"content", "<mm>"}, {"special", true}, {"normalized", false}},
  });
  const json j = tiny(json::array(), json::object(), added);
  // lstrip / rstrip swallow the whitespace around the token.
  EXPECT_EQ(ids_of(j, "x <m>  y"), (std::vector<int32_t>{'x', 400, 'y'}));
  // single_word: only between non-word characters.
  EXPECT_EQ(ids_of(j, "a <w> b"), (std::vector<int32_t>{'a', ' ', 401, ' ', 'b'}));
  EXPECT_EQ(ids_of(j, "a<w>b"), (std::vector<int32_t>{'a', '<', 'w', '>', 'b'}));
  // Longest match first: "<mm>" wins over nothing shorter at the same place.
  EXPECT_EQ(ids_of(j, "<mm>"), (std::vector<int32_t>{402}));
}

TEST(TokenizerBpe, TemplatePostProcessorOnlyWithSpecialTokens) {
  json j = tiny(json::array({"a b"}), {{"ab", 256}},
                json::array({{{"id", 500}, {"content", "<s>"}, {"special", true}}}));
  j["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single", json::array({{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                              {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
      {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {500}}, {"tokens", {"<s>"}}}}}}};
  const Tokenizer t = Tokenizer::from_json(j.dump(), "tiny");
  EXPECT_EQ(t.encode("ab"), (std::vector<int32_t>{256}));
  EXPECT_EQ(t.encode("ab", true), (std::vector<int32_t>{500, 256}));
  EXPECT_EQ(t.decode(std::vector<int32_t>{500, 256}, true), "ab");
  j["post_processor"] = {{"type", "RobertaProcessing"}};
  const Tokenizer r = Tokenizer::from_json(j.dump(), "tiny");
  EXPECT_EQ(r.encode("ab"), (std::vector<int32_t>{256}));
  expect_input_error([&] { r.encode("ab", true); }, {"RobertaProcessing"});
}

TEST(TokenizerRegex, OnigWhiteSpaceClassReplacesPcre2s) {
  const std::string p = SplitRegex::onig_compatible(R"(\s+(?!\S)|[^\s\p{L}\p{N}]+|\\s)");
  EXPECT_EQ(p.find("\\s"), p.find("\\\\s") + 1) << p;  // only the escaped backslash stays
  EXPECT_EQ(p.find("\\S"), std::string::npos) << p;
  std::vector<std::pair<size_t, size_t>> m;
  SplitRegex(R"(\s+)", false, "test")
      .find_all(
          "a\xE1\xA0\x8E"
          "b \xE3\x80\x80"
          "c",
          m);
  // U+180E is not White_Space for Oniguruma (the tokenizers library); U+3000 is.
  ASSERT_EQ(m.size(), 1u);
  EXPECT_EQ(m[0], (std::pair<size_t, size_t>{5, 9}));
}

TEST(TokenizerRegex, LettersOfNewerUnicodeCountAsLetters) {
  // U+1C89 (Unicode 16) is a letter for Oniguruma; PCRE2 10.42's tables predate it.
  std::vector<std::pair<size_t, size_t>> m;
  SplitRegex(R"(\p{L}+)", false, "test").find_all("\xE1\xB2\x89x!", m);
  ASSERT_EQ(m.size(), 1u);
  EXPECT_EQ(m[0], (std::pair<size_t, size_t>{0, 4}));
  SplitRegex(R"([^\p{L}]+)", false, "test").find_all("\xE1\xB2\x89x!", m);
  ASSERT_EQ(m.size(), 1u);
  EXPECT_EQ(m[0], (std::pair<size_t, size_t>{4, 5}));
}

TEST(TokenizerText, NfcLeavesMarksNewerThanUnicode9Alone) {
  // U+0301 after e composes; U+1DFA (Unicode 14, class 218) is not moved before U+0338
  // (class 1) because the library's Unicode 9.0 tables give it class 0.
  EXPECT_EQ(text::nfc("e\xCC\x81"), "\xC3\xA9");
  EXPECT_EQ(text::nfc("a\xE1\xB7\xBA\xCC\xB8"), "a\xE1\xB7\xBA\xCC\xB8");
  // Without such a mark the same pair is put in canonical order.
  EXPECT_EQ(text::nfc("a\xCD\x85\xCC\xB8"), "a\xCC\xB8\xCD\x85");
}

TEST(TokenizerErrors, UnsupportedModelTypeNamesTheType) {
  json j = tiny(json::array());
  j["model"] = {{"type", "WordPiece"}, {"vocab", json::object()}};
  expect_input_error([&] { Tokenizer::from_json(j.dump(), "wp.json"); }, {"WordPiece", "wp.json"});
  j["model"]["type"] = "Unigram";
  expect_input_error([&] { Tokenizer::from_json(j.dump(), "u.json"); }, {"Unigram"});
}

TEST(TokenizerErrors, UnsupportedComponentsNameTheirType) {
  json j = tiny(json::array());
  j["pre_tokenizer"] = {{"type", "Metaspace"}};
  expect_input_error([&] { Tokenizer::from_json(j.dump(), "m.json"); }, {"Metaspace", "m.json"});
  j = tiny(json::array());
  j["normalizer"] = {{"type", "NFKC"}};
  expect_input_error([&] { Tokenizer::from_json(j.dump(), "n.json"); }, {"NFKC"});
  j = tiny(json::array());
  j["model"]["merges"] = json::array({"a q"});  // "aq" is not in the vocabulary
  expect_input_error([&] { Tokenizer::from_json(j.dump(), "x.json"); }, {"merge #0"});
  j = tiny(json::array());
  j["model"]["vocab"]["oops"] = "not an id";
  expect_input_error([&] { Tokenizer::from_json(j.dump(), "v.json"); }, {"v.json", "model.vocab"});
  j = tiny(json::array({json::array({"a", "b", "c"})}));
  expect_input_error([&] { Tokenizer::from_json(j.dump(), "p.json"); }, {"merge #0", "pair"});
}

TEST(TokenizerErrors, MissingFileOrDirectoryWithoutTokenizerJson) {
  const fs::path missing = fs::temp_directory_path() / "nanscope-no-such-tokenizer.json";
  expect_input_error([&] { Tokenizer::load(missing); }, {missing.string()});
  const fs::path dir = fs::temp_directory_path() / "nanscope-tok-empty-dir";
  fs::create_directories(dir);
  expect_input_error([&] { Tokenizer::load(dir); }, {dir.string(), "tokenizer.json"});
  fs::remove_all(dir);
}

TEST(TokenizerErrors, InvalidOrTruncatedJsonNamesTheFile) {
  const fs::path path = fs::temp_directory_path() / "nanscope-truncated-tokenizer.json";
  {
    std::ifstream in(kDir / "qwen3" / "tokenizer.json", std::ios::binary);
    std::string head(4096, '\0');
    in.read(head.data(), static_cast<std::streamsize>(head.size()));
    std::ofstream(path, std::ios::binary) << head.substr(0, static_cast<size_t>(in.gcount()));
  }
  expect_input_error([&] { Tokenizer::load(path); }, {path.string(), "not valid JSON"});
  fs::remove(path);
  expect_input_error([&] { Tokenizer::from_json("[1, 2]", "list.json"); }, {"list.json"});
}

}  // namespace
}  // namespace nanscope
