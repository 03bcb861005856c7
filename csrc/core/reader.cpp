#include "core/reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>

#include "zerockpt/errors.h"

namespace zerockpt {

SafetensorsFile::SafetensorsFile(std::string path) : path_(std::move(path)) {
  // O_NONBLOCK: a FIFO given as the path is refused below instead of waiting for a writer.
  fd_ = FileDescriptor(::open(path_.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  if (fd_.get() < 0) throw_errno(path_, "cannot open");
  read_header(0, true);
}

SafetensorsFile::SafetensorsFile(int fd, uint64_t base, std::string name, bool exact_size)
    : path_(std::move(name)) {
  fd_ = FileDescriptor(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
  if (fd_.get() < 0) throw_errno(path_, "cannot duplicate the file descriptor");
  read_header(base, exact_size);
}

void SafetensorsFile::read_header(uint64_t base, bool exact_size) {
  struct stat st{};
  if (::fstat(fd_.get(), &st) != 0) throw_errno(path_, "cannot stat");
  if (S_ISDIR(st.st_mode)) throw IoError(EISDIR, path_, "cannot load a directory");
  if (!S_ISREG(st.st_mode)) {
    throw FormatError(path_ +
                      ": not a regular file (safetensors files are mapped and read "
                      "at offsets)");
  }
  file_size_ = static_cast<uint64_t>(st.st_size);
  // What follows `base` is the safetensors file: its sizes and offsets are relative to it.
  uint64_t size = file_size_ - std::min(base, file_size_);
  if (size < 8) {
    std::string at = base ? " from offset " + std::to_string(base) : "";
    throw FormatError(path_ + ": file is " + std::to_string(size) + " bytes" + at +
                      ", too small to hold a safetensors header");
  }
  uint8_t prefix[8];
  pread_full(fd_.get(), prefix, 8, base, path_);
  uint64_t n = checked_header_size(prefix, size, path_);
  std::string json(n, '\0');  // n is bounded by kMaxHeaderSize and by the file size
  pread_full(fd_.get(), json.data(), n, base + 8, path_);
  header_ = parse_header(json.data(), n, size, path_, exact_size);
  header_.data_start += base;  // every reader adds tensor offsets to it
}

std::shared_ptr<Mapping> SafetensorsFile::mapping() {
  std::lock_guard<std::mutex> lock(map_mu_);
  if (!mapping_) mapping_ = Mapping::map(fd_.get(), file_size_, path_);
  return mapping_;
}

namespace {

VerifyResult compare(StoredChecksums stored, const std::vector<ByteRange>& bytes, bool mapped,
                     unsigned threads, Progress* progress) {
  VerifyResult result;
  if (!stored.present) return result;
  result.has_checksums = true;
  result.stored = std::move(stored.crcs);
  result.computed = checksum_ranges(bytes, mapped, threads, progress);
  for (size_t i = 0; i < result.stored.size(); ++i) {
    if (result.stored[i] != result.computed[i]) result.failed.push_back(i);
  }
  return result;
}

}  // namespace

VerifyResult SafetensorsFile::verify(unsigned threads, Progress* progress) {
  const auto& tensors = header_.tensors;
  // Decoded before the mapping is made or a byte is read.
  StoredChecksums stored = decode_checksums(header_, path_);
  if (!stored.present) return {};
  uint8_t* base = tensors.empty() ? nullptr : mapping()->data() + header_.data_start;
  std::vector<ByteRange> bytes(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    bytes[i] = {base + tensors[i].begin, tensors[i].nbytes()};
  }
  return compare(std::move(stored), bytes, true, threads, progress);
}

VerifyResult SafetensorsFile::verify(const std::vector<ByteRange>& bytes, bool mapped,
                                     unsigned threads, Progress* progress) const {
  return compare(decode_checksums(header_, path_), bytes, mapped, threads, progress);
}

void SafetensorsFile::raise_on_failure(const VerifyResult& result) const {
  if (result.failed.empty()) return;
  constexpr size_t kListed = 20;
  auto hex = [](uint32_t v) {
    char buf[9];
    std::snprintf(buf, sizeof(buf), "%08x", v);
    return std::string(buf);
  };
  std::string what = path_ + ": " + std::to_string(result.failed.size()) + " of " +
                     std::to_string(header_.tensors.size()) +
                     " tensors do not match their stored CRC-32C (the file was corrupted after "
                     "it was written, or rewritten by a tool that copied zerockpt's metadata): ";
  for (size_t k = 0; k < result.failed.size() && k < kListed; ++k) {
    size_t i = result.failed[k];
    const TensorRecord& t = header_.tensors[i];
    if (k) what += ", ";
    what += quote(t.name) + " (bytes " + std::to_string(header_.data_start + t.begin) + "-" +
            std::to_string(header_.data_start + t.end) + " of the file: stored " +
            hex(result.stored[i]) + ", computed " + hex(result.computed[i]) + ")";
  }
  if (result.failed.size() > kListed) {
    what += " and " + std::to_string(result.failed.size() - kListed) + " more";
  }
  throw ChecksumError(what);
}

}  // namespace zerockpt
