#include "kvf/store/shared_arena.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

namespace kvf::store {

namespace {

constexpr uint64_t kHugetlbfsMagic = 0x958458f6;  // HUGETLBFS_MAGIC from linux/magic.h

std::string errno_text(int err) {
  return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")";
}

// Node names may hold anything the topology accepts; names in /dev/shm keep to a safe set.
std::string safe_tag(const std::string& tag) {
  std::string out;
  for (char c : tag) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
                    c == '_' || c == '.';
    out += ok ? c : '_';
  }
  return out.empty() ? "node" : out;
}

std::string first_hugetlbfs_mount() {
  std::ifstream mounts("/proc/mounts");
  std::string line;
  while (std::getline(mounts, line)) {
    std::istringstream in(line);
    std::string device, dir, type;
    in >> device >> dir >> type;
    if (type == "hugetlbfs" && access(dir.c_str(), W_OK) == 0) return dir;
  }
  return {};
}

std::string thp_shmem_setting() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
  std::string line;
  std::getline(f, line);
  const auto open = line.find('[');
  const auto close = line.find(']');
  if (open == std::string::npos || close == std::string::npos || close < open) return "unknown";
  return line.substr(open + 1, close - open - 1);
}

// Removes "<prefix><pid>" entries of `dir` whose process is gone: arenas of a daemon that was
// killed before it could clean up. Entries of live processes are left alone.
void remove_stale(const std::string& dir, const std::string& prefix, bool shm) {
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return;
  while (dirent* e = readdir(d)) {
    std::string name = e->d_name;
    if (name.rfind(prefix, 0) != 0) continue;
    const std::string rest = name.substr(prefix.size());
    if (rest.empty() || rest.find_first_not_of("0123456789") != std::string::npos || rest.size() > 9)
      continue;
    const pid_t pid = static_cast<pid_t>(std::stol(rest));
    if (pid <= 0 || kill(pid, 0) == 0 || errno != ESRCH) continue;
    if (shm) {
      shm_unlink(("/" + name).c_str());
    } else {
      unlink((dir + "/" + name).c_str());
    }
  }
  closedir(d);
}

}  // namespace

Result<SharedArena> SharedArena::create(const std::string& tag, uint64_t bytes, bool try_huge_pages) {
  if (bytes == 0) return Status(ErrorCode::kInvalidArgument, "store arena: size 0");
  const std::string prefix = "kvfabric-" + safe_tag(tag) + "-";
  const std::string leaf = prefix + std::to_string(getpid());
  SharedArena arena;
  arena.bytes_ = bytes;
  arena.creator_ = true;

  std::string why_not;
  if (try_huge_pages) {
    const std::string mount = first_hugetlbfs_mount();
    if (mount.empty()) {
      why_not = "no writable hugetlbfs mount (MAP_HUGETLB works only there for memory other processes map)";
    } else {
      remove_stale(mount, prefix, false);
      const std::string path = mount + "/" + leaf;
      int fd = ::open(path.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
      if (fd < 0) {
        why_not = "open(" + path + "): " + errno_text(errno);
      } else {
        struct statfs fs {};
        uint64_t page = 2u << 20;
        if (fstatfs(fd, &fs) == 0 && static_cast<uint64_t>(fs.f_type) == kHugetlbfsMagic && fs.f_bsize > 0) {
          page = static_cast<uint64_t>(fs.f_bsize);
        }
        const uint64_t mapped = (bytes + page - 1) / page * page;
        void* p = MAP_FAILED;
        int err = 0;
        if (ftruncate(fd, static_cast<off_t>(mapped)) != 0) {
          err = errno;
        } else {
          // hugetlbfs reserves the pages here: too few free huge pages fail now with ENOMEM.
          p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
          if (p == MAP_FAILED) err = errno;
        }
        close(fd);
        if (p != MAP_FAILED) {
          arena.data_ = static_cast<uint8_t*>(p);
          arena.mapped_ = mapped;
          arena.name_ = path;
          arena.backing_ = Backing::kHugetlbfs;
          arena.note_ =
              "huge pages: arena on hugetlbfs " + path + " (" + std::to_string(page >> 10) + " KiB pages)";
          return arena;
        }
        unlink(path.c_str());
        why_not = "hugetlbfs " + mount + " could not hold " + std::to_string(mapped) +
                  " bytes: " + errno_text(err) + " (reserve pages with /proc/sys/vm/nr_hugepages)";
      }
    }
  } else {
    why_not = "not asked for";
  }

  remove_stale("/dev/shm", prefix, true);
  const std::string name = "/" + leaf;
  int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) return Status(ErrorCode::kInvalidArgument, "shm_open(" + name + "): " + errno_text(errno));
  auto fail = [&](const std::string& what, int err) {
    close(fd);
    shm_unlink(name.c_str());
    return Status(ErrorCode::kOutOfMemory, "store arena " + name + " of " + std::to_string(bytes) +
                                               " bytes: " + what + ": " + errno_text(err));
  };
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) return fail("ftruncate", errno);
  // posix_fallocate returns the error instead of setting errno.
  if (int err = posix_fallocate(fd, 0, static_cast<off_t>(bytes)); err != 0) {
    return fail("posix_fallocate (is /dev/shm large enough?)", err);
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return fail("mmap", errno);
  close(fd);
  const std::string thp = thp_shmem_setting();
  const bool advised = madvise(p, bytes, MADV_HUGEPAGE) == 0;
  arena.data_ = static_cast<uint8_t*>(p);
  arena.mapped_ = bytes;
  arena.name_ = name;
  arena.backing_ = Backing::kPosixShm;
  arena.note_ = "huge pages: not used (" + why_not + "); arena in POSIX shm " + name + ", " +
                (advised ? "madvise(MADV_HUGEPAGE) set" : "madvise(MADV_HUGEPAGE) refused") +
                ", transparent huge pages for shmem: " + thp;
  return arena;
}

Result<SharedArena> SharedArena::open(Backing backing, const std::string& name, uint64_t bytes) {
  if (bytes == 0) return Status(ErrorCode::kInvalidArgument, "store arena " + name + ": size 0");
  int fd = backing == Backing::kHugetlbfs ? ::open(name.c_str(), O_RDWR) : shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) {
    const int err = errno;
    return Status(err == ENOENT ? ErrorCode::kNotFound : ErrorCode::kInvalidArgument,
                  "open store arena " + name + ": " + errno_text(err));
  }
  struct stat st {};
  if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < bytes) {
    close(fd);
    return Status(ErrorCode::kInvalidArgument, "store arena " + name + " is smaller than the " +
                                                   std::to_string(bytes) + " bytes the daemon announced");
  }
  const uint64_t mapped = static_cast<uint64_t>(st.st_size);
  void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  close(fd);
  if (p == MAP_FAILED)
    return Status(ErrorCode::kOutOfMemory, "mmap store arena " + name + ": " + errno_text(err));
  SharedArena arena;
  arena.data_ = static_cast<uint8_t*>(p);
  arena.bytes_ = bytes;
  arena.mapped_ = mapped;
  arena.name_ = name;
  arena.backing_ = backing;
  return arena;
}

SharedArena::SharedArena(SharedArena&& other) noexcept {
  *this = std::move(other);
}

SharedArena& SharedArena::operator=(SharedArena&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    mapped_ = std::exchange(other.mapped_, 0);
    name_ = std::move(other.name_);
    backing_ = other.backing_;
    creator_ = std::exchange(other.creator_, false);
    note_ = std::move(other.note_);
  }
  return *this;
}

SharedArena::~SharedArena() {
  release();
}

void SharedArena::release() {
  if (data_ != nullptr) munmap(data_, mapped_);
  if (creator_ && !name_.empty()) {
    if (backing_ == Backing::kHugetlbfs) {
      unlink(name_.c_str());
    } else {
      shm_unlink(name_.c_str());
    }
  }
  data_ = nullptr;
  creator_ = false;
}

}  // namespace kvf::store
