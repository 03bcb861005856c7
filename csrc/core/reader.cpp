#include "core/reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "zerockpt/errors.h"

namespace zerockpt {

SafetensorsFile::SafetensorsFile(std::string path) : path_(std::move(path)) {
  fd_ = FileDescriptor(::open(path_.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd_.get() < 0) throw_errno(path_, "cannot open");
  struct stat st{};
  if (::fstat(fd_.get(), &st) != 0) throw_errno(path_, "cannot stat");
  if (S_ISDIR(st.st_mode)) throw IoError(EISDIR, path_, "cannot load a directory");
  if (!S_ISREG(st.st_mode)) {
    throw FormatError(path_ +
                      ": not a regular file (safetensors files are mapped and read "
                      "at offsets)");
  }
  file_size_ = static_cast<uint64_t>(st.st_size);
  if (file_size_ < 8) {
    throw FormatError(path_ + ": file is " + std::to_string(file_size_) +
                      " bytes, too small to hold a safetensors header");
  }
  uint8_t prefix[8];
  pread_full(fd_.get(), prefix, 8, 0, path_);
  uint64_t n = checked_header_size(prefix, file_size_, path_);
  std::string json(n, '\0');  // n is bounded by kMaxHeaderSize and by the file size
  pread_full(fd_.get(), json.data(), n, 8, path_);
  header_ = parse_header(json.data(), n, file_size_, path_);
}

std::shared_ptr<Mapping> SafetensorsFile::mapping() {
  std::lock_guard<std::mutex> lock(map_mu_);
  if (!mapping_) mapping_ = Mapping::map(fd_.get(), file_size_, path_);
  return mapping_;
}

}  // namespace zerockpt
