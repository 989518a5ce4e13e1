#include "kvf/store/ssd_tier.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "kvf/store/chunk_checksum.h"
#include "kvf/store/chunk_store.h"

namespace kvf::store {

using protocol::ChunkKey;

namespace {

constexpr size_t kMaxPooledBounces = 8;

std::string errno_text(int err) {
  return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")";
}

bool block_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kSsdBlock == 0;
}

uint64_t round_block(uint64_t n) {
  return (n + kSsdBlock - 1) & ~(kSsdBlock - 1);
}

}  // namespace

std::string_view ssd_io_mode_name(SsdIoMode mode) {
  switch (mode) {
    case SsdIoMode::kAuto:
      return "auto";
    case SsdIoMode::kDirect:
      return "direct";
    case SsdIoMode::kBuffered:
      return "buffered";
  }
  return "unknown";
}

Result<std::unique_ptr<SsdTier>> SsdTier::open(SsdTierOptions options) {
  if (options.path.empty()) return Status(ErrorCode::kInvalidArgument, "ssd tier: no file path");
  if (options.bounce_bytes == 0 || options.bounce_bytes % kSsdBlock != 0) {
    return Status(ErrorCode::kInvalidArgument, "ssd tier: bounce buffers must be a positive multiple of " +
                                                   std::to_string(kSsdBlock) + " bytes");
  }
  const std::string& path = options.path;
  const uint64_t capacity = options.capacity & ~(kSsdBlock - 1);
  if (capacity == 0) {
    return Status(ErrorCode::kInvalidArgument, "ssd tier " + path + ": a capacity of " +
                                                   std::to_string(options.capacity) + " bytes holds no " +
                                                   std::to_string(kSsdBlock) + "-byte block");
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    return Status(ErrorCode::kInvalidArgument,
                  "ssd tier " + path + ": exists and is not a regular file (the tier is one file it owns)");
  }
  const int base_flags = O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC;
  auto open_file = [&options](int flags) {
    return options.open_file ? options.open_file(options.path.c_str(), flags, 0600)
                             : ::open(options.path.c_str(), flags, 0600);
  };
  bool direct = options.io != SsdIoMode::kBuffered;
  std::string why_buffered;
  int fd = -1;
  if (direct) {
    fd = open_file(base_flags | O_DIRECT);
    if (fd < 0 && errno == EINVAL) {
      why_buffered = "open with O_DIRECT: " + errno_text(EINVAL);
      direct = false;
    } else if (fd < 0) {
      return Status(ErrorCode::kInternal, "ssd tier " + path + ": open: " + errno_text(errno));
    }
  }
  if (fd < 0) {
    fd = open_file(base_flags);
    if (fd < 0) return Status(ErrorCode::kInternal, "ssd tier " + path + ": open: " + errno_text(errno));
  }
  auto fail = [&](ErrorCode code, const std::string& message) {
    ::close(fd);
    ::unlink(path.c_str());
    return Status(code, "ssd tier " + path + ": " + message);
  };
  // Preallocated, so that spills never meet a full disk halfway (and the extents are real blocks).
  if (int err = ::posix_fallocate(fd, 0, static_cast<off_t>(capacity)); err != 0) {
    if (err == ENOSPC) {
      return fail(ErrorCode::kOutOfMemory,
                  "the disk has no room for " + std::to_string(capacity) + " bytes: " + errno_text(err));
    }
    return fail(ErrorCode::kInternal,
                "posix_fallocate of " + std::to_string(capacity) + " bytes: " + errno_text(err));
  }
  if (direct) {
    // Some file systems accept O_DIRECT at open and refuse the I/O itself: probe one block.
    void* probe = std::aligned_alloc(kSsdBlock, kSsdBlock);
    if (probe == nullptr) return fail(ErrorCode::kOutOfMemory, "no memory for a probe block");
    std::memset(probe, 0, kSsdBlock);
    ssize_t n = ::pwrite(fd, probe, kSsdBlock, 0);
    const int err = errno;
    std::free(probe);
    if (n < 0 && err == EINVAL) {
      why_buffered = "a " + std::to_string(kSsdBlock) + "-byte O_DIRECT write: " + errno_text(err);
      const int flags = ::fcntl(fd, F_GETFL);
      if (flags < 0 || ::fcntl(fd, F_SETFL, flags & ~O_DIRECT) != 0) {
        return fail(ErrorCode::kInternal, "clearing O_DIRECT: " + errno_text(errno));
      }
      direct = false;
    } else if (n != static_cast<ssize_t>(kSsdBlock)) {
      return fail(ErrorCode::kInternal, "probe write: " + (n < 0 ? errno_text(err) : "short write"));
    }
  }
  if (!why_buffered.empty()) {
    if (options.io == SsdIoMode::kDirect) {
      return fail(ErrorCode::kUnavailable, "the file system refuses O_DIRECT (" + why_buffered + ")");
    }
    spdlog::warn(
        "ssd tier {}: the file system refuses O_DIRECT ({}); using buffered I/O (the page cache "
        "keeps a second copy of spilled chunks)",
        path, why_buffered);
  }
  auto allocator = ArenaAllocator::create(capacity, kSsdBlock);
  if (!allocator.ok()) return fail(allocator.status().code(), allocator.status().message());
  return std::unique_ptr<SsdTier>(new SsdTier(std::move(options), std::move(allocator.value()), fd, direct));
}

SsdTier::SsdTier(SsdTierOptions options, ArenaAllocator allocator, int fd, bool direct)
    : options_(std::move(options)), allocator_(std::move(allocator)), fd_(fd), direct_(direct) {
  s_.capacity_bytes = allocator_.capacity();
}

SsdTier::~SsdTier() {
  ::close(fd_);
  ::unlink(options_.path.c_str());
}

std::unique_ptr<uint8_t, void (*)(void*)> SsdTier::take_bounce() {
  {
    std::lock_guard lock(bounce_mu_);
    if (!bounces_.empty()) {
      auto b = std::move(bounces_.back());
      bounces_.pop_back();
      return b;
    }
  }
  return {static_cast<uint8_t*>(std::aligned_alloc(kSsdBlock, options_.bounce_bytes)), std::free};
}

void SsdTier::give_bounce(std::unique_ptr<uint8_t, void (*)(void*)> buffer) {
  std::lock_guard lock(bounce_mu_);
  if (buffer && bounces_.size() < kMaxPooledBounces) bounces_.push_back(std::move(buffer));
}

Status SsdTier::io_error(const char* what, uint64_t offset, int err) const {
  // A full disk is out of space, not a broken one; EIO and the rest are the device's errors.
  return Status(err == ENOSPC ? ErrorCode::kOutOfMemory : ErrorCode::kInternal,
                "ssd tier " + options_.path + ": " + what + " at offset " + std::to_string(offset) + ": " +
                    errno_text(err));
}

Status SsdTier::pwrite_all(const uint8_t* data, uint64_t length, uint64_t offset) {
  uint64_t done = 0;
  while (done < length) {
    ssize_t n = ::pwrite(fd_, data + done, length - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return io_error("pwrite", offset + done, errno);
    if (n == 0) {
      return Status(ErrorCode::kInternal, "ssd tier " + options_.path + ": pwrite at offset " +
                                              std::to_string(offset + done) + " wrote nothing");
    }
    done += static_cast<uint64_t>(n);
  }
  bytes_written_.fetch_add(length, std::memory_order_relaxed);
  return Status::Ok();
}

Status SsdTier::pread_all(uint8_t* data, uint64_t length, uint64_t offset) {
  uint64_t done = 0;
  while (done < length) {
    ssize_t n = ::pread(fd_, data + done, length - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return io_error("pread", offset + done, errno);
    if (n == 0) {
      return Status(ErrorCode::kInternal, "ssd tier " + options_.path + ": short read at offset " +
                                              std::to_string(offset + done) + ": " + std::to_string(done) +
                                              " of " + std::to_string(length) +
                                              " bytes, then end of file (was the file truncated?)");
    }
    done += static_cast<uint64_t>(n);
  }
  bytes_read_.fetch_add(length, std::memory_order_relaxed);
  return Status::Ok();
}

Status SsdTier::write_at(uint64_t offset, std::span<const uint8_t> bytes) {
  if (offset % kSsdBlock != 0 || offset > capacity() || round_block(bytes.size()) > capacity() - offset) {
    return Status(ErrorCode::kInvalidArgument,
                  "ssd tier " + options_.path + ": write of " + std::to_string(bytes.size()) +
                      " bytes at offset " + std::to_string(offset) + " is not inside the file's blocks");
  }
  if (options_.before_write) {
    if (Status s = options_.before_write(offset, bytes.size()); !s.ok()) return s;
  }
  if (!direct_) return pwrite_all(bytes.data(), bytes.size(), offset);
  uint64_t done = 0;
  const uint64_t whole = bytes.size() & ~(kSsdBlock - 1);
  if (whole > 0 && block_aligned(bytes.data())) {  // straight from the caller's buffer
    if (Status s = pwrite_all(bytes.data(), whole, offset); !s.ok()) return s;
    done = whole;
  }
  if (done == bytes.size()) return Status::Ok();
  auto bounce = take_bounce();
  if (!bounce) return Status(ErrorCode::kOutOfMemory, "ssd tier " + options_.path + ": no bounce buffer");
  Status status;
  while (done < bytes.size() && status.ok()) {
    const uint64_t n = std::min<uint64_t>(options_.bounce_bytes, bytes.size() - done);
    const uint64_t padded = round_block(n);
    std::memcpy(bounce.get(), bytes.data() + done, n);
    if (padded > n) std::memset(bounce.get() + n, 0, padded - n);
    status = pwrite_all(bounce.get(), padded, offset + done);
    done += n;
  }
  give_bounce(std::move(bounce));
  return status;
}

Status SsdTier::read_at(uint64_t offset, std::span<uint8_t> out) {
  if (offset % kSsdBlock != 0 || offset > capacity() || round_block(out.size()) > capacity() - offset) {
    return Status(ErrorCode::kInvalidArgument,
                  "ssd tier " + options_.path + ": read of " + std::to_string(out.size()) +
                      " bytes at offset " + std::to_string(offset) + " is not inside the file's blocks");
  }
  if (!direct_) return pread_all(out.data(), out.size(), offset);
  uint64_t done = 0;
  const uint64_t whole = out.size() & ~(kSsdBlock - 1);
  if (whole > 0 && block_aligned(out.data())) {  // straight into the caller's buffer
    if (Status s = pread_all(out.data(), whole, offset); !s.ok()) return s;
    done = whole;
  }
  if (done == out.size()) return Status::Ok();
  auto bounce = take_bounce();
  if (!bounce) return Status(ErrorCode::kOutOfMemory, "ssd tier " + options_.path + ": no bounce buffer");
  Status status;
  while (done < out.size() && status.ok()) {
    const uint64_t n = std::min<uint64_t>(options_.bounce_bytes, out.size() - done);
    // The padding past the chunk lies inside its extent (extents are whole blocks).
    status = pread_all(bounce.get(), round_block(n), offset + done);
    if (status.ok()) std::memcpy(out.data() + done, bounce.get(), n);
    done += n;
  }
  give_bounce(std::move(bounce));
  return status;
}

Result<ArenaBlock> SsdTier::allocate_extent(uint64_t bytes) {
  if (bytes == 0 || bytes > capacity()) {
    return Status(ErrorCode::kInvalidArgument, "ssd tier " + options_.path + ": a chunk of " +
                                                   std::to_string(bytes) + " bytes cannot be placed in " +
                                                   std::to_string(capacity()));
  }
  std::optional<ArenaBlock> extent;
  while (!(extent = allocator_.allocate(bytes))) {
    auto victim = lru_.victim();
    if (!victim) {
      return Status(ErrorCode::kOutOfMemory,
                    "ssd tier " + options_.path + ": no extent of " + std::to_string(bytes) +
                        " bytes with every entry evicted (" + std::to_string(s_.bytes_taken) +
                        " bytes held by entries being read back, " + std::to_string(s_.bytes_writing) +
                        " by entries being written)");
    }
    auto it = index_.find(*victim);
    lru_.on_remove(*victim);
    if (it == index_.end()) continue;  // cannot happen: the order tracks the index
    (void)allocator_.free(it->second.extent);
    --s_.entries;
    s_.bytes_entries -= it->second.extent.length;
    ++s_.evictions;
    index_.erase(it);
  }
  ++s_.writing;
  s_.bytes_writing += extent->length;
  return *extent;
}

void SsdTier::insert(const SsdEntry& entry) {
  --s_.writing;
  s_.bytes_writing -= entry.extent.length;
  if (!index_.emplace(entry.key, entry).second) {
    // The owner keeps a key in one place; freeing the extent beats corrupting the index.
    spdlog::error("ssd tier: chunk {} inserted twice; the second copy is dropped", entry.key.to_hex());
    (void)allocator_.free(entry.extent);
    return;
  }
  lru_.on_insert(entry.key);
  ++s_.puts;
  ++s_.entries;
  s_.bytes_entries += entry.extent.length;
}

void SsdTier::release_written(const ArenaBlock& extent) {
  --s_.writing;
  s_.bytes_writing -= extent.length;
  if (Status st = allocator_.free(extent); !st.ok()) spdlog::error("ssd tier: {}", st.to_string());
}

Result<SsdEntry> SsdTier::put(const ChunkKey& key, std::span<const uint8_t> bytes, uint64_t checksum,
                              const ChunkKey& model, protocol::KvCodec codec, uint64_t loads) {
  if (index_.count(key) != 0) {
    return Status(ErrorCode::kAborted, "ssd tier: chunk " + key.to_hex() + " is already stored");
  }
  auto extent = allocate_extent(bytes.size());
  if (!extent.ok()) return extent.status();
  if (Status s = write_at(extent->offset, bytes); !s.ok()) {
    release_written(*extent);
    return s;
  }
  SsdEntry e{key, *extent, bytes.size(), checksum, model, codec, loads};
  insert(e);
  return e;
}

const SsdEntry* SsdTier::find(const ChunkKey& key) const {
  auto it = index_.find(key);
  return it == index_.end() ? nullptr : &it->second;
}

std::optional<SsdEntry> SsdTier::take(const ChunkKey& key) {
  auto it = index_.find(key);
  if (it == index_.end()) return std::nullopt;
  SsdEntry e = it->second;
  index_.erase(it);
  lru_.on_remove(key);
  --s_.entries;
  s_.bytes_entries -= e.extent.length;
  ++s_.taken;
  s_.bytes_taken += e.extent.length;
  ++s_.takes;
  return e;
}

void SsdTier::restore(const SsdEntry& entry) {
  --s_.taken;
  s_.bytes_taken -= entry.extent.length;
  ++s_.restores;
  index_.emplace(entry.key, entry);
  lru_.on_insert(entry.key);
  ++s_.entries;
  s_.bytes_entries += entry.extent.length;
}

void SsdTier::release_extent(const ArenaBlock& extent) {
  --s_.taken;
  s_.bytes_taken -= extent.length;
  if (Status st = allocator_.free(extent); !st.ok()) spdlog::error("ssd tier: {}", st.to_string());
}

bool SsdTier::erase(const ChunkKey& key) {
  auto it = index_.find(key);
  if (it == index_.end()) return false;
  (void)allocator_.free(it->second.extent);
  lru_.on_remove(key);
  --s_.entries;
  s_.bytes_entries -= it->second.extent.length;
  ++s_.erases;
  index_.erase(it);
  return true;
}

std::vector<SsdEntry> SsdTier::erase_if(const std::function<bool(const SsdEntry&)>& pred) {
  std::vector<SsdEntry> out;
  for (const auto& [key, e] : index_) {
    if (pred(e)) out.push_back(e);
  }
  for (const auto& e : out) erase(e.key);
  return out;
}

std::vector<SsdEntry> SsdTier::clear() {
  return erase_if([](const SsdEntry&) { return true; });
}

void SsdTier::for_each(const std::function<void(const SsdEntry&)>& visit) const {
  for (const auto& [key, e] : index_) visit(e);
}

Status SsdTier::read(const SsdEntry& entry, std::span<uint8_t> out, bool verify) {
  if (out.size() != entry.bytes) {
    return Status(ErrorCode::kInvalidArgument, "ssd tier: read of chunk " + entry.key.to_hex() + " into " +
                                                   std::to_string(out.size()) + " bytes; it has " +
                                                   std::to_string(entry.bytes));
  }
  if (Status s = read_at(entry.extent.offset, out); !s.ok()) return s;
  if (verify && chunk_checksum_parallel(out.data(), out.size()) != entry.checksum) {
    return Status(ErrorCode::kVerifyFailed,
                  "ssd tier " + options_.path + ": chunk " + entry.key.to_hex() + " read back from offset " +
                      std::to_string(entry.extent.offset) + " does not match its checksum");
  }
  return Status::Ok();
}

SsdTierStats SsdTier::stats() const {
  SsdTierStats out = s_;
  out.capacity_bytes = allocator_.capacity();
  out.bytes_used = allocator_.bytes_used();
  out.bytes_free = allocator_.bytes_free();
  out.largest_free_block = allocator_.largest_free();
  out.bytes_written = bytes_written_.load(std::memory_order_relaxed);
  out.bytes_read = bytes_read_.load(std::memory_order_relaxed);
  return out;
}

Status SsdTier::audit() const {
  auto broken = [this](const std::string& what) {
    return Status(ErrorCode::kInternal, "ssd tier " + options_.path + " audit: " + what);
  };
  uint64_t bytes = 0;
  std::vector<ArenaBlock> extents;
  for (const auto& [key, e] : index_) {
    if (!(e.key == key)) return broken("an entry indexed under another key");
    if (e.extent.length != round_block(e.bytes)) return broken("extent length of " + key.to_hex());
    bytes += e.extent.length;
    extents.push_back(e.extent);
  }
  if (index_.size() != s_.entries) return broken("entries " + std::to_string(index_.size()) + " vs stats");
  if (bytes != s_.bytes_entries) return broken("entry bytes " + std::to_string(bytes) + " vs stats");
  if (lru_.size() != index_.size()) return broken("eviction order tracks " + std::to_string(lru_.size()));
  if (allocator_.bytes_used() != s_.bytes_entries + s_.bytes_taken + s_.bytes_writing) {
    return broken("allocated " + std::to_string(allocator_.bytes_used()) + " != entries " +
                  std::to_string(s_.bytes_entries) + " + taken " + std::to_string(s_.bytes_taken) +
                  " + writing " + std::to_string(s_.bytes_writing));
  }
  std::sort(extents.begin(), extents.end(),
            [](const ArenaBlock& a, const ArenaBlock& b) { return a.offset < b.offset; });
  for (size_t i = 1; i < extents.size(); ++i) {
    if (extents[i - 1].offset + extents[i - 1].length > extents[i].offset) {
      return broken("extents overlap at offset " + std::to_string(extents[i].offset));
    }
  }
  if (s_.puts + s_.restores != s_.entries + s_.evictions + s_.erases + s_.takes) {
    return broken("puts + restores != entries + evictions + erases + takes");
  }
  if (s_.takes - s_.restores < s_.taken) return broken("more entries taken than takes");
  return Status::Ok();
}

}  // namespace kvf::store
