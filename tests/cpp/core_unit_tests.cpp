// Unit tests of csrc/core through its C++ API: `zerockpt_unit_tests SUITE` runs one suite and
// exits non-zero on the first failed check, printing where. No test framework: the checks are
// few and each names what it expects.
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/align.h"
#include "core/crc32c.h"
#include "core/dtype.h"
#include "core/file.h"
#include "core/header.h"
#include "core/json.h"
#include "zerockpt/errors.h"

namespace zerockpt {
namespace {

int g_checks = 0;

#define CHECK(cond)                                                                 \
  do {                                                                              \
    ++g_checks;                                                                     \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

std::string message_of(const std::exception& e) { return e.what(); }
std::string message_of(const JsonSyntaxError& e) { return e.message; }

// Runs `f`, which must throw E with a message containing each of `words`.
template <typename E>
void expect_throw(const std::function<void()>& f, const std::vector<std::string>& words, int line) {
  ++g_checks;
  try {
    f();
  } catch (const E& e) {
    std::string what = message_of(e);
    for (const auto& w : words) {
      if (what.find(w) == std::string::npos) {
        std::fprintf(stderr, "line %d: message lacks '%s': %s\n", line, w.c_str(), what.c_str());
        std::exit(1);
      }
    }
    return;
  } catch (...) {
    std::fprintf(stderr, "line %d: wrong exception type\n", line);
    std::exit(1);
  }
  std::fprintf(stderr, "line %d: no exception\n", line);
  std::exit(1);
}
#define EXPECT_THROW(E, f, ...) expect_throw<E>(f, {__VA_ARGS__}, __LINE__)

std::string read_json_string(const std::string& literal) {
  JsonReader r(literal.data(), literal.size());
  std::string s = r.read_string();
  CHECK(r.at_end());
  return s;
}

void test_json() {
  CHECK(read_json_string(R"("plain")") == "plain");
  CHECK(read_json_string(R"("a\"b\\c\/d\n\t")") == "a\"b\\c/d\n\t");
  CHECK(read_json_string(R"("\u00e9")") == "\xc3\xa9");
  CHECK(read_json_string(R"("\ud83d\ude00")") == "\xf0\x9f\x98\x80");      // surrogate pair
  EXPECT_THROW(JsonSyntaxError, [] { read_json_string(R"("\ud83d")"); });  // lone surrogate
  EXPECT_THROW(JsonSyntaxError, [] { read_json_string(R"("\x41")"); });
  EXPECT_THROW(JsonSyntaxError, [] { read_json_string("\"raw\ncontrol\""); });
  EXPECT_THROW(JsonSyntaxError, [] { read_json_string(R"("unterminated)"); });

  // Every byte string written by append_json_string reads back unchanged.
  std::mt19937 rng(1);
  for (int trial = 0; trial < 500; ++trial) {
    std::string s;
    for (int i = rng() % 40; i > 0; --i) s += static_cast<char>(rng() % 128);
    s += "\xc3\xa9\xe2\x82\xac";  // UTF-8 passes through as is
    std::string lit;
    append_json_string(lit, s);
    CHECK(read_json_string(lit) == s);
  }

  auto u64 = [](const std::string& text) {
    JsonReader r(text.data(), text.size());
    return r.read_uint64();
  };
  CHECK(u64("0") == 0);
  CHECK(u64("18446744073709551615") == UINT64_MAX);
  EXPECT_THROW(JsonSyntaxError, [&] { u64("18446744073709551616"); });  // overflow
  EXPECT_THROW(JsonSyntaxError, [&] { u64("-1"); });
  EXPECT_THROW(JsonSyntaxError, [&] { u64("1.5"); });
  EXPECT_THROW(JsonSyntaxError, [&] { u64("1e3"); });
  EXPECT_THROW(JsonSyntaxError, [&] { u64("01"); });

  // Nesting is bounded: deep input fails cleanly instead of recursing without limit.
  std::string deep(JsonReader::kMaxDepth + 1, '[');
  deep += std::string(JsonReader::kMaxDepth + 1, ']');
  EXPECT_THROW(JsonSyntaxError, [&] {
    JsonReader r(deep.data(), deep.size());
    r.skip_value(0);
  });
  std::string ok = R"({"a": [1, 2.5e-3, true, null, {"b": "c"}], "d": false})";
  JsonReader r(ok.data(), ok.size());
  r.skip_value(0);
  CHECK(r.at_end());

  // UTF-8 validation: offsets of the first bad byte.
  const std::string good = "ascii \xc3\xa9 \xf0\x9f\x98\x80";
  CHECK(find_invalid_utf8(good.data(), good.size()) == good.size());
  const std::string overlong = "ab\xc0\xaf";
  CHECK(find_invalid_utf8(overlong.data(), overlong.size()) == 2);
  const std::string surrogate = "x\xed\xa0\x80";
  CHECK(find_invalid_utf8(surrogate.data(), surrogate.size()) == 1);
  const std::string too_big = "\xf4\x90\x80\x80";
  CHECK(find_invalid_utf8(too_big.data(), too_big.size()) == 0);
  const std::string truncated = "abc\xe2\x82";
  CHECK(find_invalid_utf8(truncated.data(), truncated.size()) == 3);
}

void test_crc32c() {
  const std::string check = "123456789";
  CHECK(crc32c(check.data(), check.size()) == 0xE3069283u);  // the standard check value
  CHECK(crc32c_portable(check.data(), check.size()) == 0xE3069283u);
  CHECK(crc32c(nullptr, 0) == 0);
  std::vector<uint8_t> zeros(32, 0);
  CHECK(crc32c(zeros.data(), zeros.size()) == 0x8A9136AAu);  // RFC 3720 B.4

  std::mt19937 rng(7);
  std::vector<uint8_t> data(1 << 16);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  for (int trial = 0; trial < 200; ++trial) {
    size_t begin = rng() % data.size();
    size_t len = rng() % (data.size() - begin + 1);
    uint32_t hw = crc32c(data.data() + begin, len);
    CHECK(hw == crc32c_portable(data.data() + begin, len));
    size_t split = len ? rng() % (len + 1) : 0;
    uint32_t a = crc32c(data.data() + begin, split);
    uint32_t b = crc32c(data.data() + begin + split, len - split);
    CHECK(crc32c(data.data() + begin + split, len - split, a) == hw);  // streaming
    CHECK(crc32c_combine(a, b, len - split) == hw);
  }
  std::printf("crc32c backend: %s\n", crc32c_backend());
}

Header parse_prefix(const Layout& layout, const std::string& path) {
  const auto* bytes = reinterpret_cast<const uint8_t*>(layout.prefix.data());
  uint64_t n = checked_header_size(bytes, layout.file_size(), path);
  return parse_header(layout.prefix.data() + 8, n, layout.file_size(), path);
}

void test_plan_layout() {
  std::vector<TensorSpec> specs = {
      {"bias", Dtype::kF16, {3}, 6},  {"weight", Dtype::kF64, {2, 2}, 32},
      {"mask", Dtype::kBool, {5}, 5}, {"empty", Dtype::kF32, {0, 4}, 0},
      {"scalar", Dtype::kI32, {}, 4}, {"\xc3\xa9t\"range\\", Dtype::kU8, {1}, 1},
  };
  Metadata metadata = {{"format", "pt"}, {"note", "a \"quoted\" value"}};
  for (bool checksums : {false, true}) {
    Layout layout = plan_layout(specs, metadata, "x.safetensors", checksums);
    CHECK(layout.prefix.size() % kDataAlignment == 0);
    Header h = parse_prefix(layout, "x.safetensors");
    CHECK(h.data_start == layout.prefix.size());
    CHECK(h.data_size == layout.data_size);
    CHECK(h.tensors.size() == specs.size());
    uint64_t total = 0;
    for (size_t i = 0; i < specs.size(); ++i) {
      const auto& t = h.tensors[i];  // the JSON lists tensors in the given order
      CHECK(t.name == specs[i].name);
      CHECK(t.dtype == specs[i].dtype);
      CHECK(t.shape == specs[i].shape);
      CHECK(t.begin == layout.begin[i]);
      CHECK(t.nbytes() == specs[i].nbytes);
      CHECK(t.begin % (dtype_bits(t.dtype) / 8) == 0);  // element-aligned
      total += t.nbytes();
    }
    CHECK(total == layout.data_size);  // no holes (parse_header also checks overlap)
    // Largest element size first.
    CHECK(layout.begin[1] == 0);
    CHECK(h.metadata.size() == metadata.size() + (checksums ? 1 : 0));
    CHECK(h.metadata[1].second == "a \"quoted\" value");
    if (checksums) {
      CHECK(layout.checksum_offset != Layout::kNoChecksums);
      CHECK(layout.prefix.substr(layout.checksum_offset, 8 * specs.size()) ==
            std::string(8 * specs.size(), '0'));
      CHECK(h.metadata.back().first == kChecksumKey);
    } else {
      CHECK(layout.checksum_offset == Layout::kNoChecksums);
    }
  }
  // The format's header limit is enforced on the writer's side, naming the file.
  std::vector<TensorSpec> many(1, {std::string(1 << 20, 'n'), Dtype::kU8, {0}, 0});
  for (int i = 0; i < 100; ++i) {
    many.push_back(many[0]);
    many.back().name += std::to_string(i);
  }
  EXPECT_THROW(
      UsageError, [&] { plan_layout(many, {}, "big.safetensors"); }, "big.safetensors", "limit");
}

// A file of `data_size` data bytes whose header is `json`.
Header parse(const std::string& json, uint64_t data_size) {
  return parse_header(json.data(), json.size(), 8 + json.size() + data_size, "f.safetensors");
}

void test_header() {
  Header h =
      parse(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
            R"("__metadata__":{"k":"v"},"b":{"dtype":"U8","shape":[],"data_offsets":[8,9]}})",
            9);
  CHECK(h.tensors.size() == 2 && h.tensors[1].name == "b" && h.metadata.size() == 1);
  CHECK(parse(R"({"__metadata__":null})", 0).metadata.empty());

  const char* f32 = R"("dtype":"F32","shape":[2])";
  auto entry = [&](const std::string& name, int begin, int end) {
    return "\"" + name + "\":{" + f32 + ",\"data_offsets\":[" + std::to_string(begin) + "," +
           std::to_string(end) + "]}";
  };
  EXPECT_THROW(
      FormatError, [&] { parse("{" + entry("a", 0, 8) + "," + entry("a", 8, 16) + "}", 16); },
      "f.safetensors", "duplicate tensor", "'a'");
  EXPECT_THROW(
      FormatError, [&] { parse("{" + entry("a", 0, 8) + "," + entry("b", 4, 12) + "}", 12); },
      "overlaps");
  EXPECT_THROW(
      FormatError, [&] { parse("{" + entry("a", 0, 8) + "," + entry("b", 12, 20) + "}", 20); },
      "hole");
  EXPECT_THROW(FormatError, [&] { parse("{" + entry("a", 0, 8) + "}", 12); }, "hole", "end");
  EXPECT_THROW(FormatError, [&] { parse("{" + entry("a", 0, 8) + "}", 4); }, "'a'", "truncated");
  EXPECT_THROW(FormatError, [&] { parse("{" + entry("a", 0, 4) + "}", 4); }, "'a'", "need 8 bytes");
  EXPECT_THROW(FormatError, [&] { parse("{" + entry("a", 8, 0) + "}", 8); }, "end before begin");
  EXPECT_THROW(
      FormatError, [&] { parse(R"({"a":{"dtype":"X9","shape":[],"data_offsets":[0,0]}})", 0); },
      "unknown dtype", "'X9'");
  EXPECT_THROW(
      FormatError, [&] { parse(R"({"a":{"shape":[],"data_offsets":[0,0]}})", 0); },
      "missing 'dtype'");
  EXPECT_THROW(
      FormatError,
      [&] {
        parse(R"({"a":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,0]}})", 0);
      },
      "overflows");
  EXPECT_THROW(FormatError, [&] { parse(R"({"__metadata__":{"k":1}})", 0); }, "not a string");
  EXPECT_THROW(
      FormatError, [&] { parse(R"({"__metadata__":{},"__metadata__":{}})", 0); }, "duplicate key");
  EXPECT_THROW(FormatError, [&] { parse(R"({"__metadata__":{}} trailing)", 0); }, "byte", "after");
  EXPECT_THROW(FormatError, [&] { parse("{\"\xff\":1}", 0); }, "UTF-8");
  EXPECT_THROW(FormatError, [&] { parse("[]", 0); }, "JSON object");

  // A stream may hold more after the file: without exact_size the data ends with its last
  // tensor, and only tensors past the bytes there are are truncated.
  std::string two = "{" + entry("a", 0, 8) + "," + entry("b", 8, 16) + "}";
  Header open_ended = parse_header(two.data(), two.size(), 8 + two.size() + 100, "s", false);
  CHECK(open_ended.data_size == 16 && open_ended.data_start == 8 + two.size());
  EXPECT_THROW(
      FormatError, [&] { parse_header(two.data(), two.size(), 8 + two.size() + 12, "s", false); },
      "'b'", "truncated");
  std::string gap = "{" + entry("a", 0, 8) + "," + entry("b", 12, 20) + "}";
  EXPECT_THROW(
      FormatError, [&] { parse_header(gap.data(), gap.size(), UINT64_MAX, "s", false); }, "hole");

  uint8_t prefix[8] = {0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0};
  EXPECT_THROW(
      FormatError, [&] { checked_header_size(prefix, 1 << 20, "p.bin"); }, "p.bin", "exceeds");
  uint8_t small[8] = {64, 0, 0, 0, 0, 0, 0, 0};
  EXPECT_THROW(FormatError, [&] { checked_header_size(small, 40, "p.bin"); }, "past the end");
}

void test_dtype() {
  // The one table: every enumerator has its own name, which parses back to it.
  const Dtype last = Dtype::kF6_E3M2;
  for (int i = 0; i <= static_cast<int>(last); ++i) {
    auto d = static_cast<Dtype>(i);
    CHECK(parse_dtype(dtype_name(d)) == d);
  }
  CHECK(dtype_bits(Dtype::kF4) == 4 && dtype_bits(Dtype::kF6_E2M3) == 6);
  CHECK(dtype_bits(Dtype::kBF16) == 16 && dtype_bits(Dtype::kC64) == 64);
  CHECK(std::string(dtype_name(Dtype::kF8_E8M0)) == "F8_E8M0");
  CHECK(!parse_dtype("f32") && !parse_dtype("") && !parse_dtype("F4 "));
  // F4 sizes: whole bytes only.
  CHECK(tensor_nbytes(Dtype::kF4, {3, 8}, "a", "p") == 12);
  EXPECT_THROW(FormatError, [&] { tensor_nbytes(Dtype::kF4, {3}, "a", "p"); }, "'a'", "F4");
}

// A fresh empty directory under $TMPDIR (or /tmp).
std::string make_temp_dir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/zerockpt-unit-XXXXXX";
  CHECK(::mkdtemp(&tmpl[0]) != nullptr);
  return tmpl;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  CHECK(d != nullptr);
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name != "." && name != "..") out.push_back(name);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void remove_tree(const std::string& dir) {
  for (const std::string& name : list_dir(dir)) {
    std::string path = dir + "/" + name;
    struct stat st{};
    if (::lstat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
      remove_tree(path);
    } else {
      ::unlink(path.c_str());
    }
  }
  ::rmdir(dir.c_str());
}

void test_files() {
  CHECK(round_up(0, kPageBytes) == 0 && round_up(1, kPageBytes) == kPageBytes);
  CHECK(round_up(kPageBytes, kPageBytes) == kPageBytes && round_up(4097, 4096) == 8192);
  CHECK(round_up(65, 64) == 128 && round_up(7, 1) == 7);
  static_assert(kDataAlignment % kPageBytes == 0, "the data region starts on a page");

  const std::string root = make_temp_dir();
  // make_directories creates every missing level, and accepts an existing directory.
  make_directories(root + "/a/b/c", /*durable=*/true);
  struct stat st{};
  CHECK(::stat((root + "/a/b/c").c_str(), &st) == 0 && S_ISDIR(st.st_mode));
  make_directories(root + "/a/b", /*durable=*/false);
  write_text(root + "/file", "x");
  EXPECT_THROW(IoError, [&] { make_directories(root + "/file/sub", false); }, "file/sub");

  // A commit renames the staged files in and leaves no staging directory behind.
  const std::string dir = root + "/ckpt";
  make_directories(dir, false);
  write_text(dir + "/old", "old contents");
  ::chmod((dir + "/old").c_str(), 0640);
  {
    StagingDirectory staging(dir, "model.safetensors.index.json");
    CHECK(staging.path().find(kStagingSuffix) != std::string::npos);
    CHECK(::stat(staging.path().c_str(), &st) == 0 && (st.st_mode & 0777) == 0700);
    write_text(staging.file("old"), "new contents");
    write_text(staging.file("index"), "{}");
    staging.commit({"old", "index"}, /*durable=*/true);
  }
  CHECK(read_text(dir + "/old") == "new contents" && read_text(dir + "/index") == "{}");
  CHECK(::stat((dir + "/old").c_str(), &st) == 0 && (st.st_mode & 0777) == 0640);  // kept
  CHECK((list_dir(dir) == std::vector<std::string>{"index", "old"}));

  // A destination that cannot be replaced fails the commit before any rename.
  ::mkdir((dir + "/blocked").c_str(), 0755);
  {
    StagingDirectory staging(dir, "idx");
    write_text(staging.file("index"), "second");
    write_text(staging.file("blocked"), "y");
    EXPECT_THROW(IoError, [&] { staging.commit({"index", "blocked"}, false); }, "blocked");
  }
  CHECK(read_text(dir + "/index") == "{}");
  CHECK((list_dir(dir) == std::vector<std::string>{"blocked", "index", "old"}));

  // Without a commit, the directory and what was staged are removed.
  {
    StagingDirectory staging(dir, "idx");
    write_text(staging.file("shard"), "z");
  }
  CHECK((list_dir(dir) == std::vector<std::string>{"blocked", "index", "old"}));

  // A dead writer's directory (nobody holds its lock) is removed, a live one's is not, nor
  // is anything that only looks similar.
  const std::string dead = dir + "/.idx.999999.0123456789abcdef" + kStagingSuffix;
  const std::string live = dir + "/.idx.999998.fedcba9876543210" + kStagingSuffix;
  const std::string other = dir + "/.idx.12.nothex" + kStagingSuffix;
  for (const auto& d : {dead, live, other}) CHECK(::mkdir(d.c_str(), 0700) == 0);
  write_text(dead + "/shard", "partial");
  int held = ::open(live.c_str(), O_RDONLY | O_DIRECTORY);
  CHECK(held >= 0 && ::flock(held, LOCK_EX) == 0);
  CHECK(remove_stale_staging_directories(dir) == 1);
  CHECK(::access(dead.c_str(), F_OK) != 0 && ::access(live.c_str(), F_OK) == 0);
  CHECK(::access(other.c_str(), F_OK) == 0);
  ::close(held);  // its writer "dies": the next staging directory cleans it up
  {
    StagingDirectory staging(dir, "idx");
  }
  CHECK(::access(live.c_str(), F_OK) != 0);
  CHECK(remove_stale_staging_directories(root + "/missing") == 0);
  remove_tree(root);
}

}  // namespace
}  // namespace zerockpt

int main(int argc, char** argv) {
  const std::map<std::string, void (*)()> suites = {
      {"json", zerockpt::test_json},
      {"crc32c", zerockpt::test_crc32c},
      {"plan_layout", zerockpt::test_plan_layout},
      {"header", zerockpt::test_header},
      {"dtype", zerockpt::test_dtype},
      {"files", zerockpt::test_files},
  };
  if (argc != 2 || !suites.count(argv[1])) {
    std::fprintf(stderr, "usage: zerockpt_unit_tests json|crc32c|plan_layout|header|dtype|files\n");
    return 2;
  }
  suites.at(argv[1])();
  std::printf("%s: %d checks passed\n", argv[1], zerockpt::g_checks);
  return 0;
}
