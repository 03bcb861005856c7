// Error hierarchy of the core. Messages name the file, tensor and offset at fault; the Python
// binding maps FormatError -> zerockpt.FormatError (ValueError), ChecksumError ->
// zerockpt.ChecksumError (a FormatError), IoError -> OSError(errno,
// filename), UsageError -> ValueError, DtypeError -> TypeError and Cancelled ->
// KeyboardInterrupt. Thread-safe value types.
#pragma once

#include <stdexcept>
#include <string>

namespace zerockpt {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The bytes of a file do not form a valid checkpoint (header, offsets, shapes, dtypes).
class FormatError : public Error {
 public:
  using Error::Error;
};

// Tensor bytes do not match the checksum stored for them (corruption on disk or in transit).
class ChecksumError : public FormatError {
 public:
  using FormatError::FormatError;
};

// A system call failed. `path` is the user-visible path (never a temporary name alone).
class IoError : public Error {
 public:
  IoError(int err, std::string path, const std::string& what);
  int err() const noexcept { return err_; }
  const std::string& path() const noexcept { return path_; }
  // strerror(err) plus the context given at the throw site.
  const std::string& detail() const noexcept { return detail_; }

 private:
  int err_;
  std::string path_;
  std::string detail_;
};

// The caller asked for something impossible (overlapping views, reserved metadata keys...).
class UsageError : public Error {
 public:
  using Error::Error;
};

// A dtype that the file format cannot represent, or that has no in-memory equivalent.
class DtypeError : public Error {
 public:
  using Error::Error;
};

// The caller asked a running call to stop (Progress::cancel); nothing was committed.
class Cancelled : public Error {
 public:
  using Error::Error;
};

// Throws IoError for `errno` with "<what>: <strerror>" as the message.
[[noreturn]] void throw_errno(const std::string& path, const std::string& what);

// Quotes a user-controlled string for messages, truncating very long ones.
std::string quote(const std::string& s);

}  // namespace zerockpt
