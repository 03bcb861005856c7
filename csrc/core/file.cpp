#include "core/file.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>

#include "zerockpt/errors.h"

namespace zerockpt {

const char* const kTempSuffix = ".zerockpt-tmp";
const char* const kStagingSuffix = ".zerockpt-staging";

namespace {

// Linux transfers at most this much per read/write call.
constexpr uint64_t kMaxIo = 1ull << 30;

std::string dirname_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string basename_of(const std::string& path) {
  auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// Drops `n` transferred bytes from the front of `iov` starting at index `first`.
void advance_iov(std::vector<iovec>& iov, size_t& first, uint64_t n) {
  while (n > 0 && first < iov.size()) {
    if (n >= iov[first].iov_len) {
      n -= iov[first].iov_len;
      ++first;
    } else {
      iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + n;
      iov[first].iov_len -= n;
      n = 0;
    }
  }
  while (first < iov.size() && iov[first].iov_len == 0) ++first;
}

struct FaultState {
  std::atomic<bool> armed{false};
  std::mutex mu;
  FaultOp op = FaultOp::kWrite;
  int err = 0;
  uint64_t skip = 0;
};

FaultState& fault_state() {
  static auto* state = new FaultState();  // leaked on purpose: usable during exit
  return *state;
}

}  // namespace

void inject_fault(FaultOp op, int err, uint64_t after) {
  auto& f = fault_state();
  std::lock_guard<std::mutex> lock(f.mu);
  f.op = op;
  f.err = err;
  f.skip = after;
  f.armed.store(true);
}

void clear_faults() { fault_state().armed.store(false); }

bool fault(FaultOp op) {
  auto& f = fault_state();
  if (!f.armed.load(std::memory_order_relaxed)) return false;
  std::lock_guard<std::mutex> lock(f.mu);
  if (!f.armed.load() || f.op != op) return false;
  if (f.skip > 0) {
    --f.skip;
    return false;
  }
  errno = f.err;
  return true;
}

FileDescriptor& FileDescriptor::operator=(FileDescriptor&& o) noexcept {
  if (this != &o) {
    reset();
    fd_ = o.release();
  }
  return *this;
}

void FileDescriptor::reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void FileDescriptor::close_checked(const std::string& path) {
  int fd = release();
  if (fd >= 0 && ::close(fd) != 0 && errno != EINTR) throw_errno(path, "close failed");
}

void pread_full(int fd, void* dst, uint64_t size, uint64_t offset, const std::string& path) {
  auto* p = static_cast<uint8_t*>(dst);
  while (size > 0) {
    ssize_t n = fault(FaultOp::kRead)
                    ? -1
                    : ::pread(fd, p, size < kMaxIo ? size : kMaxIo, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno(path, "read of " + std::to_string(size) + " bytes at offset " +
                            std::to_string(offset) + " failed");
    }
    if (n == 0) {
      throw IoError(EIO, path,
                    "unexpected end of file at offset " + std::to_string(offset) +
                        " (file shrank while reading?)");
    }
    p += n;
    size -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

void pwrite_full(int fd, const void* src, uint64_t size, uint64_t offset, const std::string& path) {
  const auto* p = static_cast<const uint8_t*>(src);
  while (size > 0) {
    ssize_t n = fault(FaultOp::kWrite)
                    ? -1
                    : ::pwrite(fd, p, size < kMaxIo ? size : kMaxIo, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno(path, "write of " + std::to_string(size) + " bytes at offset " +
                            std::to_string(offset) + " failed");
    }
    p += n;
    size -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

void pwritev_full(int fd, std::vector<iovec>& iov, uint64_t offset, const std::string& path) {
  size_t first = 0;
  advance_iov(iov, first, 0);
  while (first < iov.size()) {
    int count = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
    ssize_t n = fault(FaultOp::kWrite)
                    ? -1
                    : ::pwritev(fd, iov.data() + first, count, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno(path, "write at offset " + std::to_string(offset) + " failed");
    }
    offset += static_cast<uint64_t>(n);
    advance_iov(iov, first, static_cast<uint64_t>(n));
  }
}

void preadv_full(int fd, std::vector<iovec>& iov, uint64_t offset, const std::string& path) {
  size_t first = 0;
  advance_iov(iov, first, 0);
  while (first < iov.size()) {
    int count = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
    ssize_t n = fault(FaultOp::kRead)
                    ? -1
                    : ::preadv(fd, iov.data() + first, count, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno(path, "read at offset " + std::to_string(offset) + " failed");
    }
    if (n == 0) {
      throw IoError(EIO, path,
                    "unexpected end of file at offset " + std::to_string(offset) +
                        " (file shrank while reading?)");
    }
    offset += static_cast<uint64_t>(n);
    advance_iov(iov, first, static_cast<uint64_t>(n));
  }
}

std::shared_ptr<Mapping> Mapping::map(int fd, uint64_t size, const std::string& path) {
  // MAP_NORESERVE: copy-on-write pages are only charged if the caller writes to them.
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
  if (p == MAP_FAILED) throw_errno(path, "mmap of " + std::to_string(size) + " bytes failed");
  return std::shared_ptr<Mapping>(new Mapping(static_cast<uint8_t*>(p), size));
}

Mapping::~Mapping() { ::munmap(data_, size_); }

namespace {

// A zerockpt temporary file: ".<name>.<pid>.<16 hex digits>.zerockpt-tmp".
bool is_temp_name(const char* name) {
  size_t n = std::strlen(name);
  size_t suffix = std::strlen(kTempSuffix);
  return name[0] == '.' && n > suffix + 1 && std::strcmp(name + n - suffix, kTempSuffix) == 0;
}

// A staging directory's name: ".<name>.<pid digits>.<16 hex digits>.zerockpt-staging".
bool is_staging_name(const std::string& entry) {
  const std::string suffix = kStagingSuffix;
  if (entry.size() < suffix.size() || entry[0] != '.' ||
      entry.compare(entry.size() - suffix.size(), suffix.size(), suffix) != 0) {
    return false;
  }
  std::string rest = entry.substr(0, entry.size() - suffix.size());  // ".<name>.<pid>.<hex>"
  auto is_hex = [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); };
  auto is_digit = [](char c) { return c >= '0' && c <= '9'; };
  if (rest.size() < 17 || rest[rest.size() - 17] != '.') return false;
  if (!std::all_of(rest.end() - 16, rest.end(), is_hex)) return false;
  rest.resize(rest.size() - 17);  // ".<name>.<pid>"
  size_t dot = rest.find_last_of('.');
  if (dot == std::string::npos || dot < 2 || dot + 1 == rest.size()) return false;
  return std::all_of(rest.begin() + static_cast<std::ptrdiff_t>(dot) + 1, rest.end(), is_digit);
}

// 16 hex digits that no other writer in this or another process picks at the same time.
std::string random_token() {
  static std::atomic<uint64_t> counter{0};
  std::random_device rd;
  uint64_t token = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ counter.fetch_add(1);
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(token));
  return hex;
}

// Removes every entry of the directory open as `fd` (files only: we create nothing else in
// one), then the directory `path`. false if anything is left.
bool empty_and_remove(int fd, const std::string& path) {
  int listing = ::dup(fd);
  if (listing < 0) return false;
  DIR* d = ::fdopendir(listing);
  if (!d) {
    ::close(listing);
    return false;
  }
  ::rewinddir(d);
  while (dirent* e = ::readdir(d)) {
    if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
    (void)::unlinkat(fd, e->d_name, 0);
  }
  ::closedir(d);
  return ::rmdir(path.c_str()) == 0;
}

// flock(LOCK_EX) on `fd`, retried on EINTR: 1 if locked, 0 if another holder has it (only
// when !blocking), -1 if the file system cannot lock.
int lock_exclusive(int fd, bool blocking) {
  while (::flock(fd, blocking ? LOCK_EX : LOCK_EX | LOCK_NB) != 0) {
    if (errno == EINTR) continue;
    return errno == EWOULDBLOCK ? 0 : -1;
  }
  return 1;
}

// fsync of the directory `dir`; IoError naming `path` (the file whose commit needs it).
void sync_directory(const std::string& dir, const std::string& path) {
  FileDescriptor dfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dfd.get() < 0) throw_errno(path, "cannot open directory " + dir + " to fsync it");
  if ((fault(FaultOp::kFsync) || ::fsync(dfd.get()) != 0)) {
    throw_errno(path, "fsync of directory " + dir + " failed");
  }
}

// The destination's name, cut (at a UTF-8 character boundary) so that the temporary name,
// "." + stem + tail, fits NAME_MAX.
std::string temp_stem(const std::string& name, size_t tail) {
  size_t room = NAME_MAX > tail + 1 ? NAME_MAX - tail - 1 : 0;
  if (name.size() <= room) return name;
  size_t cut = room;
  while (cut > 0 && (static_cast<unsigned char>(name[cut]) & 0xC0) == 0x80) --cut;
  return name.substr(0, cut);
}

}  // namespace

// A writer holds an exclusive flock on its temporary file from before the file can be seen
// complete until after it is renamed; the kernel drops the lock when the writer dies, however
// it dies. So a temporary file that can be locked belongs to nobody: a crashed or killed save.
size_t remove_stale_temp_files(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) return 0;  // the save itself reports an unusable directory
  size_t removed = 0;
  while (dirent* e = ::readdir(d)) {
    if (!is_temp_name(e->d_name)) continue;
    std::string path = dir + "/" + e->d_name;
    FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
    if (fd.get() < 0) continue;
    struct stat st{};
    if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) continue;  // its writer is alive
    // Locked: unlinked by its writer, or by another cleaner, since we listed it?
    if (::fstat(fd.get(), &st) != 0 || st.st_nlink == 0) continue;
    if (::unlink(path.c_str()) == 0) ++removed;
  }
  ::closedir(d);
  return removed;
}

namespace {

const char* file_kind(mode_t mode) {
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  return "not a regular file";
}

}  // namespace

Destination check_destination(const std::string& path) {
  Destination dest;
  dest.path = path;
  dest.target = path;
  struct stat st{};
  for (int hops = 0;; ++hops) {
    // Any other failure (a missing directory...) is reported by the temporary file's creation.
    if (::lstat(dest.target.c_str(), &st) != 0) return dest;
    if (!S_ISLNK(st.st_mode)) break;
    if (hops == 40) throw IoError(ELOOP, path, "cannot resolve the destination");
    std::string link(static_cast<size_t>(st.st_size > 0 ? st.st_size : PATH_MAX) + 1, '\0');
    ssize_t n = ::readlink(dest.target.c_str(), &link[0], link.size());
    if (n < 0) throw_errno(path, "cannot read the symbolic link " + dest.target);
    link.resize(static_cast<size_t>(n));
    dest.target = link[0] == '/' ? link : dirname_of(dest.target) + "/" + link;
  }
  if (S_ISDIR(st.st_mode)) throw IoError(EISDIR, path, "cannot save over a directory");
  if (!S_ISREG(st.st_mode)) {
    throw IoError(EINVAL, path,
                  std::string("the destination is ") + file_kind(st.st_mode) +
                      ", which saving (a rename over it) would replace; nothing was written");
  }
  // Renaming needs only the directory's permission: refuse what opening it for writing would.
  if (::faccessat(AT_FDCWD, dest.target.c_str(), W_OK, AT_EACCESS) != 0) {
    throw_errno(path, "cannot replace the destination");
  }
  dest.exists = true;
  dest.mode = st.st_mode & 07777;
  dest.uid = st.st_uid;
  dest.gid = st.st_gid;
  return dest;
}

void replace_destination(int fd, const std::string& tmp, const Destination& dest) {
  if (dest.exists) {
    // Owner and group first (chown may clear set-id bits), then the mode: the replaced file's,
    // as writing into it in place would keep them. Another user's file keeps at least its group
    // where we belong to it; otherwise the new file is ours.
    if (::fchown(fd, dest.uid, dest.gid) != 0) (void)::fchown(fd, static_cast<uid_t>(-1), dest.gid);
    (void)::fchmod(fd, dest.mode);
  }
  if (fault(FaultOp::kRename) || ::rename(tmp.c_str(), dest.target.c_str()) != 0) {
    throw_errno(dest.path, "rename of the temporary file over the destination failed");
  }
}

void replace_file(const std::string& staged, const std::string& path) {
  Destination dest = check_destination(path);
  FileDescriptor fd(::open(staged.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) throw_errno(path, "cannot open the file to commit, " + staged);
  replace_destination(fd.get(), staged, dest);
}

AtomicFile::AtomicFile(std::string path, bool direct)
    : path_(std::move(path)), dest_(check_destination(path_)) {
  const bool exists = dest_.exists;
  std::string dir = dirname_of(dest_.target);
  remove_stale_temp_files(dir);
  for (int attempt = 0;; ++attempt) {
    std::string tail = "." + std::to_string(::getpid()) + "." + random_token() + kTempSuffix;
    tmp_path_ = dir + "/." + temp_stem(basename_of(dest_.target), tail.size()) + tail;
    int flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC;
    int fd = -1;
    direct_ = false;
    if (direct) {
      fd = ::open(tmp_path_.c_str(), flags | O_DIRECT, exists ? 0600 : 0666);
      if (fd < 0 && errno == EINVAL) {
        ::unlink(tmp_path_.c_str());  // the file system may have created it before refusing
      } else {
        direct_ = fd >= 0;
      }
    }
    // Private while written when replacing a file (its mode is applied at commit), so the
    // owner can always open it to check its lock, whatever mode the destination has.
    mode_t mode = exists ? 0600 : 0666;
    if (fd < 0) fd = ::open(tmp_path_.c_str(), flags, mode);
    if (fd < 0) throw_errno(path_, "cannot create a temporary file in " + dir);
    fd_ = FileDescriptor(fd);
    // Blocks only while a cleaner that found the new file holds it; if that cleaner removed
    // it, start over under a new name. File systems without flock go on unlocked.
    (void)lock_exclusive(fd, /*blocking=*/true);
    struct stat own{};
    if (::fstat(fd, &own) == 0 && own.st_nlink == 0 && attempt < 100) continue;
    break;
  }
}

AtomicFile::~AtomicFile() {
  if (!committed_) {
    ::unlink(tmp_path_.c_str());  // while still locked, so no cleaner races the unlink
    fd_.reset();
  }
}

void AtomicFile::preallocate(uint64_t size) {
  if (size == 0) return;
  // fallocate(2), not posix_fallocate(3): glibc's fallback for the latter writes zeros.
  while (fault(FaultOp::kFallocate) ||
         ::fallocate(fd_.get(), 0, 0, static_cast<off_t>(size)) != 0) {
    if (errno == EINTR) continue;
    if (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL) return;
    throw_errno(path_, "cannot reserve " + std::to_string(size) + " bytes");
  }
}

void AtomicFile::truncate(uint64_t size) {
  if (::ftruncate(fd_.get(), static_cast<off_t>(size)) != 0) {
    throw_errno(path_, "truncate to " + std::to_string(size) + " bytes failed");
  }
}

void AtomicFile::commit(bool durable) {
  if (durable && (fault(FaultOp::kFsync) || ::fsync(fd_.get()) != 0)) {
    throw_errno(path_, "fsync failed");
  }
  // Renamed while still open and locked: a cleaner must never take the complete file for a
  // dead writer's leftover between the close and the rename.
  replace_destination(fd_.get(), tmp_path_, dest_);
  committed_ = true;
  fd_.close_checked(path_);
  if (durable) sync_directory(dirname_of(dest_.target), path_);
}

void make_directories(const std::string& path, bool durable) {
  std::vector<std::string> created;  // innermost first
  for (std::string probe = path;;) {
    struct stat st{};
    if (::stat(probe.c_str(), &st) == 0) {
      if (!S_ISDIR(st.st_mode)) throw IoError(ENOTDIR, path, probe + " is not a directory");
      break;
    }
    created.push_back(probe);
    std::string parent = dirname_of(probe);
    if (parent == probe) break;
    probe = parent;
  }
  for (auto it = created.rbegin(); it != created.rend(); ++it) {
    if (::mkdir(it->c_str(), 0777) != 0 && errno != EEXIST) {
      throw_errno(path, "cannot create directory " + *it);
    }
    if (durable) sync_directory(dirname_of(*it), path);
  }
}

size_t remove_stale_staging_directories(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) return 0;  // the save itself reports an unusable directory
  std::vector<std::string> candidates;
  while (dirent* e = ::readdir(d)) {
    if (is_staging_name(e->d_name)) candidates.emplace_back(e->d_name);
  }
  ::closedir(d);
  size_t removed = 0;
  for (const std::string& entry : candidates) {
    std::string path = dir + "/" + entry;
    FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (fd.get() < 0) continue;
    // Locked by a live writer, or unknowable without flock: leave it.
    if (lock_exclusive(fd.get(), /*blocking=*/false) != 1) continue;
    struct stat st{};
    // Removed by its writer, or by another cleaner, since we listed it?
    if (::fstat(fd.get(), &st) != 0 || st.st_nlink == 0) continue;
    if (empty_and_remove(fd.get(), path)) ++removed;
  }
  return removed;
}

StagingDirectory::StagingDirectory(const std::string& parent, const std::string& name)
    : parent_(parent) {
  remove_stale_staging_directories(parent_);
  for (int attempt = 0;; ++attempt) {
    if (attempt == 100) {  // a cleaner won 100 races in a row
      throw IoError(EAGAIN, parent_, "cannot create a staging directory");
    }
    std::string tail = "." + std::to_string(::getpid()) + "." + random_token() + kStagingSuffix;
    path_ = parent_ + "/." + temp_stem(name, tail.size()) + tail;
    if (::mkdir(path_.c_str(), 0700) != 0) {
      throw_errno(parent_, "cannot create a staging directory in " + parent_);
    }
    fd_ = FileDescriptor(::open(path_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (fd_.get() < 0) throw_errno(parent_, "cannot open the staging directory " + path_);
    // Blocks only while a cleaner that found it between mkdir and here holds it; if that
    // cleaner removed it, start over under a new name. File systems without flock go on.
    (void)lock_exclusive(fd_.get(), /*blocking=*/true);
    struct stat st{};
    if (::fstat(fd_.get(), &st) == 0 && st.st_nlink != 0) break;
    fd_.reset();
  }
}

StagingDirectory::~StagingDirectory() { remove(); }

void StagingDirectory::remove() {
  if (fd_.get() < 0) return;
  (void)empty_and_remove(fd_.get(), path_);  // while locked, so no cleaner races it
  fd_.reset();
}

void StagingDirectory::commit(const std::vector<std::string>& names, bool durable) {
  std::vector<Destination> destinations;
  destinations.reserve(names.size());
  const std::string prefix = parent_.back() == '/' ? parent_ : parent_ + "/";
  for (const std::string& name : names) destinations.push_back(check_destination(prefix + name));
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string staged = file(names[i]);
    int raw = -1;
    do {  // a signal handled on this thread (Ctrl-C) waits for the commit: retried
      raw = ::open(staged.c_str(), O_RDONLY | O_CLOEXEC);
    } while (raw < 0 && errno == EINTR);
    FileDescriptor fd(raw);
    if (fd.get() < 0) throw_errno(destinations[i].path, "cannot open the staged file " + staged);
    // The earlier renames reach the disk before the last one, which commits them all.
    if (durable && i + 1 == names.size()) sync_directory(parent_, destinations[i].path);
    replace_destination(fd.get(), staged, destinations[i]);
  }
  if (durable) sync_directory(parent_, parent_);
}

std::shared_ptr<uint8_t> allocate_pages(uint64_t size) {
  uint64_t len = std::max<uint64_t>(round_up(size, kPageBytes), kPageBytes);
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  return std::shared_ptr<uint8_t>(static_cast<uint8_t*>(p),
                                  [len](uint8_t* q) { ::munmap(q, len); });
}

namespace {

struct StagingPool {
  std::mutex mu;
  std::vector<std::pair<uint8_t*, uint64_t>> idle;
  uint64_t idle_bytes = 0;
  uint64_t live_buffers = 0;
  uint64_t live_bytes = 0;
};

StagingPool& staging_pool() {
  static auto* pool = new StagingPool();  // leaked on purpose: usable during exit
  return *pool;
}

}  // namespace

StagingBuffer::StagingBuffer(uint64_t size) : data_(nullptr), size_(size) {
  auto& pool = staging_pool();
  {
    std::lock_guard<std::mutex> lock(pool.mu);
    pool.live_buffers += 1;
    pool.live_bytes += size;
    for (size_t i = 0; i < pool.idle.size(); ++i) {
      if (pool.idle[i].second == size) {
        data_ = pool.idle[i].first;
        pool.idle_bytes -= size;
        pool.idle.erase(pool.idle.begin() + static_cast<std::ptrdiff_t>(i));
        return;
      }
    }
  }
  void* p = nullptr;
  if (::posix_memalign(&p, kPageBytes, size) != 0) {
    std::lock_guard<std::mutex> lock(pool.mu);
    pool.live_buffers -= 1;
    pool.live_bytes -= size;
    throw std::bad_alloc();
  }
  data_ = static_cast<uint8_t*>(p);
}

StagingBuffer::~StagingBuffer() {
  auto& pool = staging_pool();
  {
    std::lock_guard<std::mutex> lock(pool.mu);
    pool.live_buffers -= 1;
    pool.live_bytes -= size_;
    if (pool.idle_bytes + size_ <= kMaxPooledBytes) {
      pool.idle.emplace_back(data_, size_);
      pool.idle_bytes += size_;
      return;
    }
  }
  std::free(data_);
}

StagingBuffer::Stats StagingBuffer::stats() {
  auto& pool = staging_pool();
  std::lock_guard<std::mutex> lock(pool.mu);
  return {pool.live_buffers, pool.live_bytes, pool.idle_bytes};
}

}  // namespace zerockpt
