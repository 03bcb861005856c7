// An open safetensors file: validated header, descriptor for preads, and a lazily created
// private mapping shared by every tensor viewed from it. Methods are thread-safe after open.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "core/file.h"
#include "core/header.h"

namespace zerockpt {

class SafetensorsFile {
 public:
  // Opens and validates; throws IoError (missing, directory, unreadable) or FormatError.
  explicit SafetensorsFile(std::string path);
  const std::string& path() const { return path_; }
  const Header& header() const { return header_; }
  uint64_t file_size() const { return file_size_; }
  int fd() const { return fd_.get(); }
  // The whole file, mapped private on first use.
  std::shared_ptr<Mapping> mapping();

 private:
  std::string path_;
  FileDescriptor fd_;
  uint64_t file_size_ = 0;
  Header header_;
  std::mutex map_mu_;
  std::shared_ptr<Mapping> mapping_;
};

}  // namespace zerockpt
