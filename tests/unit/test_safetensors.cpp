// The safetensors reader: one test per rejection rule with bytes built here, and round trips
// through the writer.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "formats/safetensors.hpp"

namespace nanscope {
namespace {

namespace fs = std::filesystem;
using K = SafetensorsErrorKind;
using Bytes = std::vector<std::byte>;

// 8-byte little-endian length, the header as given, then `data_bytes` bytes of data.
Bytes make_file(std::string_view header, size_t data_bytes = 0, uint64_t n = UINT64_MAX) {
  if (n == UINT64_MAX) n = header.size();
  Bytes b(8);
  for (int i = 0; i < 8; ++i) b[size_t(i)] = std::byte((n >> (8 * i)) & 0xff);
  for (char c : header) b.push_back(std::byte(uint8_t(c)));
  for (size_t i = 0; i < data_bytes; ++i) b.push_back(std::byte(uint8_t(i * 7 + 1)));
  return b;
}

// The kind of error parsing `b` raises (fails the test if it parses).
K kind_of(const Bytes& b, std::string* message = nullptr) {
  try {
    parse_safetensors(b, "t.safetensors");
  } catch (const SafetensorsError& e) {
    if (message) *message = e.what();
    return e.kind();
  }
  ADD_FAILURE() << "parsed without error";
  return K::Io;
}

std::string one_tensor(std::string_view dtype, std::string_view shape, std::string_view offsets) {
  return fmt::format(R"({{"w":{{"dtype":"{}","shape":{},"data_offsets":{}}}}})", dtype, shape,
                     offsets);
}

// A fresh directory per test, removed at the end.
class SafetensorsFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           fmt::format("nanscope-st-{}-{}", ::getpid(),
                       ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  void write_bytes(const fs::path& p, const Bytes& b) {
    std::ofstream f(p, std::ios::binary);
    f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
  }
  fs::path dir_;
};

// ---- one test per rule ----------------------------------------------------------------------

TEST(SafetensorsParse, TooSmall) {
  for (size_t n = 0; n < 8; ++n) EXPECT_EQ(kind_of(Bytes(n)), K::TooSmall) << n;
}

TEST(SafetensorsParse, HeaderTooLarge) {
  std::string msg;
  EXPECT_EQ(kind_of(make_file("{}", 0, 123456789012ull), &msg), K::HeaderTooLarge);
  EXPECT_EQ(msg,
            "t.safetensors: header length 123456789012 exceeds the 100000000-byte limit "
            "(truncated or not a safetensors file?)");
  EXPECT_EQ(kind_of(make_file("{}", 0, 100'000'001)), K::HeaderTooLarge);
  EXPECT_EQ(kind_of(make_file("{}", 0, UINT64_MAX - 1)), K::HeaderTooLarge);
}

TEST(SafetensorsParse, HeaderOutOfBounds) {
  EXPECT_EQ(kind_of(make_file("{}", 0, 3)), K::HeaderOutOfBounds);
  EXPECT_EQ(kind_of(make_file("{}", 0, 100'000'000)), K::HeaderOutOfBounds);
}

TEST(SafetensorsParse, HeaderNotUtf8) {
  for (std::string bad : {std::string("{\"\xff\":1}"), std::string("{\"\xc0\xaf\":1}"),
                          std::string("{\"\xed\xa0\x80\":1}"),
                          std::string("{\"\xf4\x90\x80\x80\"}"), std::string("{\"\xe2\x82\"}")}) {
    EXPECT_EQ(kind_of(make_file(bad)), K::HeaderNotUtf8) << bad;
  }
  // Valid multi-byte UTF-8 in names and metadata is fine.
  EXPECT_NO_THROW(parse_safetensors(make_file(R"({"__metadata__":{"é":"日本語 😀"}})"), "t"));
}

TEST(SafetensorsParse, HeaderNotJson) {
  const char* cases[] = {
      "",                                                               // empty
      "not json",                                                       // not JSON
      "{\"w\":",                                                        // cut
      "[1,2]",                                                          // not an object
      "\"str\"",                                                        // not an object
      R"({"w":[1]})",                                                   // entry not an object
      R"({"w":{"shape":[1],"data_offsets":[0,4]}})",                    // no dtype
      R"({"w":{"dtype":"F32","data_offsets":[0,4]}})",                  // no shape
      R"({"w":{"dtype":"F32","shape":[1]}})",                           // no offsets
      R"({"w":{"dtype":32,"shape":[1],"data_offsets":[0,4]}})",         // dtype not a string
      R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})",     // negative dim
      R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})",    // fractional dim
      R"({"w":{"dtype":"F32","shape":1,"data_offsets":[0,4]}})",        // shape not an array
      R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})",    // three offsets
      R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})",     // negative offset
      R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,1e100]}})",  // not an integer
      R"({"w":{"dtype":"F32","shape":[99999999999999999999],"data_offsets":[0,4]}})",  // > u64
      R"({"__metadata__":[1]})",  // metadata not an object
      R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
      R"({"w":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
  };
  for (const char* c : cases) {
    std::string msg;
    EXPECT_EQ(kind_of(make_file(c, 4), &msg), K::HeaderNotJson) << c;
    EXPECT_EQ(msg.rfind("t.safetensors: ", 0), 0u) << msg;
  }
  // Nesting deeper than serde_json allows (128) is refused early, without building a DOM.
  EXPECT_EQ(kind_of(make_file(std::string(200'000, '['))), K::HeaderNotJson);
  EXPECT_EQ(kind_of(make_file(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":)" +
                                  std::string(129, '[') + std::string(129, ']') + "}}",
                              1)),
            K::HeaderNotJson);
  std::string msg;
  kind_of(
      make_file(
          R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
          4),
      &msg);
  EXPECT_NE(msg.find("\"w\" twice"), std::string::npos) << msg;
}

TEST(SafetensorsParse, UnknownDtype) {
  std::string msg;
  EXPECT_EQ(kind_of(make_file(one_tensor("F128", "[1]", "[0,16]"), 16), &msg), K::UnknownDtype);
  EXPECT_NE(msg.find("\"F128\""), std::string::npos);
  EXPECT_EQ(kind_of(make_file(one_tensor("bf16", "[1]", "[0,2]"), 2)), K::UnknownDtype);
}

TEST(SafetensorsParse, MetadataNotString) {
  for (const char* v : {"1", "null", "[\"a\"]", "{\"a\":\"b\"}", "true"}) {
    EXPECT_EQ(kind_of(make_file(fmt::format(R"({{"__metadata__":{{"k":{}}}}})", v))),
              K::MetadataNotString)
        << v;
  }
}

TEST(SafetensorsParse, InvalidOffsets) {
  const char* two = R"({{"a":{{"dtype":"U8","shape":[4],"data_offsets":{}}},)"
                    R"("b":{{"dtype":"U8","shape":[4],"data_offsets":{}}}}})";
  EXPECT_EQ(kind_of(make_file(fmt::format(fmt::runtime(two), "[0,4]", "[5,9]"), 9)),
            K::InvalidOffsets);  // gap
  EXPECT_EQ(kind_of(make_file(fmt::format(fmt::runtime(two), "[0,4]", "[2,6]"), 6)),
            K::InvalidOffsets);  // overlap
  EXPECT_EQ(kind_of(make_file(fmt::format(fmt::runtime(two), "[0,4]", "[0,4]"), 4)),
            K::InvalidOffsets);  // same range twice
  EXPECT_EQ(kind_of(make_file(one_tensor("U8", "[4]", "[1,5]"), 5)), K::InvalidOffsets);
  EXPECT_EQ(kind_of(make_file(one_tensor("U8", "[0]", "[4,0]"), 4)), K::InvalidOffsets);
  // Out of order in the header but contiguous once sorted: fine.
  EXPECT_NO_THROW(
      parse_safetensors(make_file(fmt::format(fmt::runtime(two), "[4,8]", "[0,4]"), 8), "t"));
}

TEST(SafetensorsParse, SizeOverflow) {
  // Element count overflows.
  EXPECT_EQ(kind_of(make_file(one_tensor("U8", "[4294967296,4294967296]", "[0,0]"))),
            K::SizeOverflow);
  // Elements fit, bits do not.
  EXPECT_EQ(kind_of(make_file(one_tensor("F32", "[1152921504606846976]", "[0,0]"))),
            K::SizeOverflow);
  // A dimension that does not fit int64.
  EXPECT_EQ(kind_of(make_file(one_tensor("U8", "[9223372036854775808,0]", "[0,0]"))),
            K::SizeOverflow);
}

TEST(SafetensorsParse, TensorSizeMismatch) {
  std::string msg;
  EXPECT_EQ(kind_of(make_file(one_tensor("F32", "[2]", "[0,4]"), 4), &msg), K::TensorSizeMismatch);
  EXPECT_NE(msg.find("needs 8 bytes"), std::string::npos) << msg;
  EXPECT_EQ(kind_of(make_file(one_tensor("BF16", "[]", "[0,4]"), 4)), K::TensorSizeMismatch);
  EXPECT_EQ(kind_of(make_file(one_tensor("F4", "[4]", "[0,4]"), 4)), K::TensorSizeMismatch);
}

// Sub-byte dtypes: the reference reader requires elements x bits to be whole bytes (it does not
// round up), then the byte count must match.
TEST(SafetensorsParse, MisalignedSlice) {
  EXPECT_EQ(kind_of(make_file(one_tensor("F4", "[3]", "[0,2]"), 2)), K::MisalignedSlice);
  EXPECT_EQ(kind_of(make_file(one_tensor("F6_E2M3", "[2]", "[0,2]"), 2)), K::MisalignedSlice);
  EXPECT_NO_THROW(parse_safetensors(make_file(one_tensor("F4", "[2,3]", "[0,3]"), 3), "t"));
  EXPECT_NO_THROW(parse_safetensors(make_file(one_tensor("F6_E3M2", "[4]", "[0,3]"), 3), "t"));
}

TEST(SafetensorsParse, TrailingBytes) {
  std::string msg;
  EXPECT_EQ(kind_of(make_file(one_tensor("F32", "[2]", "[0,8]"), 9), &msg), K::TrailingBytes);
  EXPECT_NE(msg.find("1 bytes after"), std::string::npos) << msg;
  EXPECT_EQ(kind_of(make_file(one_tensor("F32", "[2]", "[0,8]"), 7), &msg), K::TrailingBytes);
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  EXPECT_EQ(kind_of(make_file("{}", 1)), K::TrailingBytes);
  // Offsets so large that 8 + N + data size would wrap around 64 bits: 8 tensors of 2^61 - 1
  // bytes each.
  std::string big = "{";
  const uint64_t each = (uint64_t(1) << 61) - 1;
  for (uint64_t i = 0; i < 8; ++i) {
    big += fmt::format(R"({}"t{}":{{"dtype":"U8","shape":[{}],"data_offsets":[{},{}]}})",
                       i ? "," : "", i, each, i * each, (i + 1) * each);
  }
  big += "}";
  EXPECT_EQ(kind_of(make_file(big, 3)), K::TrailingBytes);
}

// ---- what is legal --------------------------------------------------------------------------

TEST(SafetensorsParse, LegalEdgeCases) {
  // Empty header object, no data.
  SafetensorsHeader h = parse_safetensors(make_file("{}"), "t");
  EXPECT_TRUE(h.tensors.empty());
  EXPECT_EQ(h.data_size(), 0u);
  // Trailing and leading whitespace (the writer pads with spaces), null metadata, unknown keys.
  h = parse_safetensors(
      make_file(
          R"(  {"__metadata__":null,"w":{"dtype":"F32","shape":[],"data_offsets":[0,4],)"
          R"("extra":{"deep":[[{"a":1,"a":2}]]}},"e":{"dtype":"BF16","shape":[0,5],"data_offsets":[4,4]}}      )",
          4),
      "t");
  ASSERT_EQ(h.tensors.size(), 2u);
  EXPECT_EQ(h.tensors[0].name, "w");  // sorted by offsets
  EXPECT_EQ(h.tensors[0].numel(), 1u);
  EXPECT_TRUE(h.tensors[0].shape.empty());
  EXPECT_EQ(h.tensors[1].name, "e");
  EXPECT_EQ(h.tensors[1].numel(), 0u);
  EXPECT_EQ(h.tensors[1].nbytes(), 0u);
  EXPECT_TRUE(h.metadata.empty());
}

// Every prefix of a valid file is rejected, and never crashes.
TEST(SafetensorsParse, EveryTruncationThrows) {
  const Bytes full = make_file(
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
      R"("b":{"dtype":"BF16","shape":[5],"data_offsets":[24,34]}}   )",
      34);
  ASSERT_NO_THROW(parse_safetensors(full, "t"));
  for (size_t cut = 0; cut < full.size(); ++cut) {
    const Bytes part(full.begin(), full.begin() + std::ptrdiff_t(cut));
    EXPECT_THROW(parse_safetensors(part, "t"), SafetensorsError) << cut;
  }
}

TEST(SafetensorsParse, ErrorKindNames) {
  EXPECT_EQ(error_kind_name(K::HeaderTooLarge), "header_too_large");
  EXPECT_EQ(error_kind_name(K::TrailingBytes), "trailing_bytes");
  EXPECT_EQ(error_kind_name(K::MisalignedSlice), "misaligned_slice");
}

// ---- files: writer and mapped reader --------------------------------------------------------

template <typename T>
std::span<const std::byte> as_bytes_of(const std::vector<T>& v) {
  return std::as_bytes(std::span<const T>(v));
}

TEST_F(SafetensorsFiles, RoundTrip) {
  const fs::path p = dir_ / "model.safetensors";
  const std::vector<float> a = {1.0f, -2.5f, 3.25f, 0.0f, -0.0f, 1e-40f};
  const std::vector<uint16_t> b = {0x3f80, 0x7fc0, 0xff80, 0x0001, 0x1234};
  const std::vector<int64_t> c = {-1, 1LL << 40};
  const std::vector<float> scalar = {42.0f};
  {
    SafetensorsWriter w(p,
                        {{"a", DType::F32, {2, 3}},
                         {"empty", DType::F16, {0, 7}},
                         {"b.weight", DType::BF16, {5}},
                         {"s", DType::F32, {}},
                         {"c", DType::I64, {2}},
                         {"u", DType::U8, {3}}},
                        {{"format", "pt"}, {"note", "quote\" and ünïcode"}});
    EXPECT_EQ(w.total_bytes() % 8, (24u + 0 + 10 + 4 + 16 + 3) % 8);
    w.write(as_bytes_of(a));
    // nothing for the empty tensor
    w.write(as_bytes_of(b).first(4));  // a tensor in two chunks
    w.write(as_bytes_of(b).subspan(4));
    w.write(as_bytes_of(scalar));
    w.write(as_bytes_of(c));
    const std::vector<std::byte> u = {std::byte(1), std::byte(2), std::byte(255)};
    w.write(u);
    w.commit();
    EXPECT_EQ(fs::file_size(p), w.total_bytes());
  }
  auto f = SafetensorsFile::open(p);
  EXPECT_EQ(f->file_size(), fs::file_size(p));
  EXPECT_EQ(f->header().header_size % 8, 0u);  // padded
  EXPECT_EQ(f->metadata().at("format"), "pt");
  EXPECT_EQ(f->metadata().at("note"), "quote\" and ünïcode");
  ASSERT_EQ(f->tensors().size(), 6u);
  // Tensors come back in the order written (sorted by offset; the empty one sits at 24).
  EXPECT_EQ(f->tensors()[0].name, "a");
  EXPECT_EQ(f->tensors()[1].name, "empty");
  EXPECT_EQ(f->tensors()[2].name, "b.weight");

  const TensorInfo* ta = f->find("a");
  ASSERT_NE(ta, nullptr);
  EXPECT_EQ(ta->dtype, DType::F32);
  EXPECT_EQ(ta->shape, (std::vector<int64_t>{2, 3}));
  auto da = f->data(*ta);
  ASSERT_EQ(da.size(), 24u);
  EXPECT_EQ(std::memcmp(da.data(), a.data(), 24), 0);
  EXPECT_EQ(load_as_f32(da.data(), DType::F32, 2), 3.25f);

  const TensorInfo* te = f->find("empty");
  ASSERT_NE(te, nullptr);
  EXPECT_EQ(te->numel(), 0u);
  EXPECT_EQ(f->data(*te).size(), 0u);

  const TensorInfo* tb = f->find("b.weight");
  ASSERT_NE(tb, nullptr);
  EXPECT_EQ(tb->dtype, DType::BF16);
  EXPECT_EQ(std::memcmp(f->data(*tb).data(), b.data(), 10), 0);
  EXPECT_TRUE(std::isnan(load_as_f32(f->data(*tb).data(), DType::BF16, 1)));

  const TensorInfo* ts = f->find("s");
  ASSERT_NE(ts, nullptr);
  EXPECT_TRUE(ts->shape.empty());
  EXPECT_EQ(ts->numel(), 1u);
  EXPECT_EQ(load_as_f32(f->data(*ts).data(), DType::F32, 0), 42.0f);

  const TensorInfo* tc = f->find("c");
  ASSERT_NE(tc, nullptr);
  EXPECT_EQ(std::memcmp(f->data(*tc).data(), c.data(), 16), 0);
  EXPECT_EQ(f->find("missing"), nullptr);

  // Zero-copy: every view points into the mapping, right after the header.
  const std::byte* first = f->data(*ta).data();
  for (const TensorInfo& t : f->tensors()) {
    EXPECT_EQ(f->data(t).data(), first + t.begin) << t.name;
  }
  EXPECT_EQ(reinterpret_cast<uintptr_t>(first) % 8, 0u);   // 8-aligned thanks to the padding
  for (const TensorInfo& t : f->tensors()) f->release(t);  // and still readable after
  EXPECT_EQ(std::memcmp(f->data(*ta).data(), a.data(), 24), 0);
}

TEST_F(SafetensorsFiles, HeaderPaddedToMultipleOf8WithSpaces) {
  for (int len = 1; len <= 9; ++len) {
    const fs::path p = dir_ / fmt::format("p{}.safetensors", len);
    SafetensorsWriter w(p, {{std::string(size_t(len), 'x'), DType::U8, {1}}});
    w.write(std::vector<std::byte>{std::byte(7)});
    w.commit();
    std::ifstream in(p, std::ios::binary);
    std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    uint64_t n = 0;
    std::memcpy(&n, all.data(), 8);
    EXPECT_EQ(n % 8, 0u);
    const std::string header = all.substr(8, n);
    const size_t close = header.rfind('}');
    EXPECT_EQ(header.find_first_not_of(' ', close + 1), std::string::npos);
    EXPECT_LT(n - close - 1, 8u);
    EXPECT_EQ(all.size(), 8 + n + 1);
  }
}

TEST_F(SafetensorsFiles, WriterNoTensorsAndMetadataFirst) {
  const fs::path p = dir_ / "m.safetensors";
  SafetensorsWriter w(p, {{"z", DType::U8, {1}}}, {{"k", "v"}});
  w.write(std::vector<std::byte>{std::byte(0)});
  w.commit();
  std::ifstream in(p, std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(all.substr(8, 17), R"({"__metadata__":{)");
}

TEST_F(SafetensorsFiles, UncommittedWriterLeavesNothing) {
  const fs::path p = dir_ / "x.safetensors";
  {
    SafetensorsWriter w(p, {{"a", DType::F32, {4}}});
    w.write(std::vector<std::byte>(8));
    EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1);
  }
  EXPECT_FALSE(fs::exists(p));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 0);
}

TEST_F(SafetensorsFiles, WriterMisuse) {
  const fs::path p = dir_ / "x.safetensors";
  SafetensorsWriter w(p, {{"a", DType::F32, {1}}});
  EXPECT_THROW(w.commit(), std::logic_error);                          // nothing written yet
  EXPECT_THROW(w.write(std::vector<std::byte>(5)), std::logic_error);  // more than declared
  EXPECT_THROW(SafetensorsWriter(dir_ / "y", {{"a", DType::F32, {-1}}}), InputError);
  EXPECT_THROW(SafetensorsWriter(dir_ / "y", {{"a", DType::U8, {1}}, {"a", DType::U8, {1}}}),
               InputError);
  EXPECT_THROW(SafetensorsWriter(dir_ / "y", {{"a", DType::F4, {3}}}), InputError);
}

TEST_F(SafetensorsFiles, WriterToMissingDirectoryThrows) {
  const fs::path p = dir_ / "no" / "such" / "dir" / "x.safetensors";
  try {
    SafetensorsWriter w(p, {{"a", DType::F32, {1}}});
    FAIL() << "no error";
  } catch (const OutputError& e) {
    EXPECT_NE(std::string(e.what()).find(p.string()), std::string::npos) << e.what();
  }
}

TEST_F(SafetensorsFiles, OpenErrors) {
  try {
    SafetensorsFile::open(dir_ / "missing.safetensors");
    FAIL() << "no error";
  } catch (const SafetensorsError& e) {
    EXPECT_EQ(e.kind(), K::Io);
    EXPECT_NE(std::string(e.what()).find("missing.safetensors"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("No such file"), std::string::npos) << e.what();
  }
  write_bytes(dir_ / "empty.safetensors", {});
  try {
    SafetensorsFile::open(dir_ / "empty.safetensors");
    FAIL() << "no error";
  } catch (const SafetensorsError& e) {
    EXPECT_EQ(e.kind(), K::TooSmall);
  }
  try {
    SafetensorsFile::open(dir_);
    FAIL() << "no error";
  } catch (const SafetensorsError& e) {
    EXPECT_EQ(e.kind(), K::Io);
  }
}

// A valid file cut at every length: each cut is rejected by open(), none crashes.
TEST_F(SafetensorsFiles, TruncatedFilesThrow) {
  const fs::path p = dir_ / "full.safetensors";
  {
    SafetensorsWriter w(p, {{"a", DType::F16, {3}}, {"b", DType::F32, {2, 2}}}, {{"k", "v"}});
    w.write(std::vector<std::byte>(6, std::byte(1)));
    w.write(std::vector<std::byte>(16, std::byte(2)));
    w.commit();
  }
  std::ifstream in(p, std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_NO_THROW(SafetensorsFile::open(p));
  const fs::path cut_path = dir_ / "cut.safetensors";
  for (size_t cut = 0; cut < all.size(); ++cut) {
    Bytes part(cut);
    if (cut) std::memcpy(part.data(), all.data(), cut);
    write_bytes(cut_path, part);
    EXPECT_THROW(SafetensorsFile::open(cut_path), SafetensorsError) << cut;
  }
}

}  // namespace
}  // namespace nanscope
