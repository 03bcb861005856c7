// POSIX file primitives with errors that name the user-visible path: full-length positional
// and vectored reads/writes (EINTR and short transfers retried), a read-only private mapping,
// AtomicFile (temporary file beside the destination, renamed over it on commit) and
// StagingDirectory (several files staged together, renamed into place on commit): the one
// atomic-commit protocol, flock-marked so that a later save removes a dead writer's leftovers.
// Functions are thread-safe on distinct ranges of one descriptor; classes are not shared.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/align.h"

namespace zerockpt {

class FileDescriptor {
 public:
  FileDescriptor() = default;
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(FileDescriptor&& o) noexcept : fd_(o.release()) {}
  FileDescriptor& operator=(FileDescriptor&& o) noexcept;
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() { reset(); }
  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset();
  // close() whose error (delayed write-back failures on some file systems) is reported.
  void close_checked(const std::string& path);

 private:
  int fd_ = -1;
};

void pread_full(int fd, void* dst, uint64_t size, uint64_t offset, const std::string& path);
void pwrite_full(int fd, const void* src, uint64_t size, uint64_t offset, const std::string& path);
// Writes/reads all of `iov` (which it may modify) starting at `offset`.
void pwritev_full(int fd, std::vector<iovec>& iov, uint64_t offset, const std::string& path);
void preadv_full(int fd, std::vector<iovec>& iov, uint64_t offset, const std::string& path);

// A whole file mapped private (copy-on-write) and writable: writes to the memory never reach
// the file, and the mapping outlives renames or unlinks of the path. Unmapped on destruction.
class Mapping {
 public:
  static std::shared_ptr<Mapping> map(int fd, uint64_t size, const std::string& path);
  ~Mapping();
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  Mapping(uint8_t* data, uint64_t size) : data_(data), size_(size) {}
  uint8_t* data_;
  uint64_t size_;
};

// The file a save to `path` replaces, checked before anything is written. Symbolic links are
// followed: the link stays and its final target is replaced (as editors save through links); a
// dangling link's target is created. Throws IoError naming `path` if the destination exists and
// is a directory (EISDIR) or anything else that is not a regular file (FIFO, socket, device:
// EINVAL), if the process may not write it (EACCES, by the rule open(2) applies for writing:
// root may), or for a loop of links (ELOOP).
struct Destination {
  std::string path;    // as the caller gave it, for messages
  std::string target;  // with symbolic links resolved: what is replaced
  bool exists = false;
  mode_t mode = 0;  // the existing file's permission bits, owner and group
  uid_t uid = 0;
  gid_t gid = 0;
};
Destination check_destination(const std::string& path);

// Commits the temporary file `tmp` (open as `fd`, in the target's directory) as `dest`: gives it
// the replaced file's mode and, where permitted, its owner and group, then renames it over
// dest.target. IoError naming dest.path if the rename fails.
void replace_destination(int fd, const std::string& tmp, const Destination& dest);

// The same commit for a complete file `staged` written by other code (in the directory of
// check_destination(path).target): checks `path`, then replace_destination.
void replace_file(const std::string& staged, const std::string& path);

// Writes go to "<dir>/.<name>.<pid>.<random>.zerockpt-tmp", held under an exclusive flock;
// commit() renames it over the destination (after fsync of the file, and then the directory,
// when durable), the destructor removes an uncommitted one. The destination is never seen
// partially written; it is checked first (check_destination), and <dir> is that of its target.
// Creating one first removes stale temporary files in the directory.
class AtomicFile {
 public:
  // `direct` asks for O_DIRECT; if the file system refuses it, direct() is false.
  AtomicFile(std::string path, bool direct);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  int fd() const { return fd_.get(); }
  bool direct() const { return direct_; }
  const std::string& path() const { return path_; }
  // Reserves `size` bytes up front (fallocate): ext4 then skips per-page delayed-allocation
  // work in buffered writes, and a full disk fails here, before any data is written. A no-op
  // on file systems without fallocate.
  void preallocate(uint64_t size);
  void truncate(uint64_t size);
  void commit(bool durable);

 private:
  std::string path_;
  Destination dest_;
  std::string tmp_path_;
  FileDescriptor fd_;
  bool direct_ = false;
  bool committed_ = false;
};

// The suffix that marks our temporary files.
extern const char* const kTempSuffix;

// Removes the temporary files in `dir` left by saves that died (crashed or killed): those whose
// writer no longer holds their lock. Returns how many it removed. AtomicFile calls it.
size_t remove_stale_temp_files(const std::string& dir);

// Creates `path` and its missing parents (mode 0777 less the umask); with `durable`, fsyncs the
// parent of each directory it created, so the new entries survive a crash. IoError naming
// `path` on failure (ENOTDIR where a component is a file).
void make_directories(const std::string& path, bool durable);

// The suffix that marks our staging directories.
extern const char* const kStagingSuffix;

// A private directory in `parent`, "<parent>/.<name>.<pid>.<16 hex digits>.zerockpt-staging"
// (mode 0700), where a save writes several files (each with AtomicFile or its own code) that
// commit() then renames into `parent` together. The writer holds an exclusive flock on it until
// it is removed; the kernel drops the lock when the writer dies, so a directory that can be
// locked is a dead save's leftover. Creating one first removes such leftovers in `parent`. The
// destructor (or remove()) deletes the directory and whatever is left in it. Not thread-safe.
class StagingDirectory {
 public:
  // IoError naming `parent` if the directory cannot be created there.
  StagingDirectory(const std::string& parent, const std::string& name);
  ~StagingDirectory();
  StagingDirectory(const StagingDirectory&) = delete;
  StagingDirectory& operator=(const StagingDirectory&) = delete;
  const std::string& path() const { return path_; }
  // "<path()>/<name>": where to stage the file that commit() will name `name`.
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  // Renames each staged file over "<parent>/<name>", in the order given, each keeping the mode
  // and owner of the file it replaces (replace_destination). Every destination is checked
  // (check_destination) before the first rename, so one that cannot be replaced fails with
  // nothing renamed. With `durable`, `parent` is fsynced before the last rename (the others
  // reach the disk first) and after it. IoError naming the destination.
  void commit(const std::vector<std::string>& names, bool durable);
  // Deletes the directory and its contents now; idempotent. A failure leaves a leftover that
  // the next StagingDirectory in `parent` removes.
  void remove();

 private:
  std::string parent_;
  std::string path_;
  FileDescriptor fd_;  // the directory, open and locked until removed
};

// Removes the staging directories in `dir` left by saves that died (nobody holds their lock).
// Returns how many it removed. StagingDirectory calls it.
size_t remove_stale_staging_directories(const std::string& dir);

// Fault injection, for tests of the error paths: once armed, the system calls of kind `op`
// after the first `after` ones fail with `err` until clear_faults(). Process-wide.
enum class FaultOp { kWrite, kRead, kFsync, kRename, kFallocate };
void inject_fault(FaultOp op, int err, uint64_t after);
void clear_faults();
// True, with errno set, if this call of kind `op` is to fail.
bool fault(FaultOp op);

// Page-aligned anonymous memory of `size` bytes (rounded up to a page, zero-filled), released
// with munmap when the last reference goes. std::bad_alloc if the system refuses it.
std::shared_ptr<uint8_t> allocate_pages(uint64_t size);

// A page-aligned buffer from a process-wide pool, returned to the pool on destruction, so
// repeated saves reuse memory that is already faulted in. The pool keeps at most
// kMaxPooledBytes idle. Thread-safe.
class StagingBuffer {
 public:
  static constexpr uint64_t kMaxPooledBytes = 64ull << 20;
  explicit StagingBuffer(uint64_t size);
  ~StagingBuffer();
  StagingBuffer(const StagingBuffer&) = delete;
  StagingBuffer& operator=(const StagingBuffer&) = delete;
  uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }

  struct Stats {
    uint64_t live_buffers, live_bytes, idle_bytes;
  };
  // Buffers in use and memory kept idle, for leak tests.
  static Stats stats();

 private:
  uint8_t* data_;
  uint64_t size_;
};

}  // namespace zerockpt
