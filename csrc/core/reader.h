// An open safetensors file: validated header, descriptor for preads, and a lazily created
// private mapping shared by every tensor viewed from it. Methods are thread-safe after open.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "core/file.h"
#include "core/header.h"
#include "core/io_engine.h"

namespace zerockpt {

// The outcome of checking tensor bytes against the checksums stored in a file.
struct VerifyResult {
  bool has_checksums = false;  // false: the file stores none (another writer), nothing checked
  std::vector<size_t> failed;  // header indices of the tensors whose bytes differ
  std::vector<uint32_t> stored, computed;  // per header tensor, when has_checksums
};

class SafetensorsFile {
 public:
  // Opens and validates; throws IoError (missing, directory, unreadable) or FormatError.
  explicit SafetensorsFile(std::string path);
  // The file that starts at offset `base` of the open regular file `fd` (duplicated: the
  // caller keeps its own), named `name` in messages. With `exact_size` false the file may be
  // followed by other bytes (parse_header); image_end() is where it ends.
  SafetensorsFile(int fd, uint64_t base, std::string name, bool exact_size);
  const std::string& path() const { return path_; }
  // Offset of the end of the data region in the descriptor's file.
  uint64_t image_end() const { return header_.data_start + header_.data_size; }
  const Header& header() const { return header_; }
  uint64_t file_size() const { return file_size_; }
  int fd() const { return fd_.get(); }
  // The whole file, mapped private on first use.
  std::shared_ptr<Mapping> mapping();
  // Checks every tensor's bytes (read through the mapping) against the stored checksums.
  // FormatError if the stored checksums are malformed. `progress` (may be null) counts the
  // bytes checked (nothing for a file without checksums) and can stop the pass.
  VerifyResult verify(unsigned threads, Progress* progress = nullptr);
  // The same for bytes already read: bytes[i] holds header tensor i (unused if size 0).
  VerifyResult verify(const std::vector<ByteRange>& bytes, bool mapped, unsigned threads,
                      Progress* progress = nullptr) const;
  // Throws ChecksumError naming every failed tensor (and this file) if `result` has failures.
  void raise_on_failure(const VerifyResult& result) const;

 private:
  // Stats the open fd_ and reads the header that starts at `base`.
  void read_header(uint64_t base, bool exact_size);

  std::string path_;
  FileDescriptor fd_;
  uint64_t file_size_ = 0;
  Header header_;
  std::mutex map_mu_;
  std::shared_ptr<Mapping> mapping_;
};

}  // namespace zerockpt
