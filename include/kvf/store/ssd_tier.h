// SsdTier: the store's second tier, one preallocated file on a local SSD. ChunkStore spills the
// committed DRAM entries it evicts into it and promotes them back into the arena when they are
// acquired (chunk_store.h); the tier alone is an index and an extent allocator over the file.
//
//   file:    one regular file at `path`, created (or truncated) at open and preallocated to
//            `capacity` (rounded down to 4 KiB) with posix_fallocate, so a spill never finds the
//            disk full halfway; removed when the tier is destroyed. Nothing in it outlives the
//            process: the index lives in memory only, a restarted daemon starts with an empty tier.
//   index:   ChunkKey -> SsdEntry {extent (file offset, length rounded up to 4 KiB), the chunk's
//            length, checksum (chunk_checksum.h), model fingerprint, codec, loads (the
//            owner's reuse count, kept for it while the entry is here)}.
//   space:   ArenaAllocator over the file (best fit, coalescing) at 4 KiB alignment, so every extent
//            starts and ends on a block boundary for O_DIRECT. When a put does not fit, the tier
//            evicts its own least recently used entries until it does. Entries are never used in
//            place: a read of an entry is a promotion, which takes it out of the tier, so LRU order
//            here is the order entries were spilled in.
//   I/O:     O_DIRECT where the file system allows it (ext4, xfs: no page cache between DRAM and
//            the SSD, which would otherwise hold a second copy of what DRAM evicted; tmpfs takes it
//            too since Linux 6.6, as a no-op on the page cache). Buffers and
//            lengths of O_DIRECT must be 4 KiB aligned: a caller's buffer that is aligned is
//            transferred directly (all but a last partial block, which goes through a bounce
//            buffer), any other through 4 KiB-aligned bounce buffers of `bounce_bytes`. Where the
//            file system refuses O_DIRECT (EINVAL at open: tmpfs before Linux 6.6; or a 4 KiB probe write
//            failing with EINVAL), kAuto falls back to buffered pread/pwrite and warns once naming the path;
//            kDirect refuses to open instead. Writes are never fdatasync'ed: the tier is a cache, and a crash
//            loses its index anyway.
//   errors:  values: a short read (the file shrank), EIO, ENOSPC are Status naming the path, the
//            offset and errno's text; a checksum mismatch on read is kVerifyFailed.
//   GDS:     GPUDirect Storage (cuFile) is not built: neither cufile.h nor libcufile exists on the
//            machines this was written on, and the store's bytes live in host memory (the arena)
//            anyway; a GPU-side reader would need the SSD tier's extents mapped for cuFile.
//
// Thread rules: the index and allocator methods (put, allocate_extent, insert, release_written,
// find, take, restore, release_extent, erase, erase_if, clear, stats, audit) are not synchronized:
// the owner (ChunkStore) calls them under its own mutex. read(), write_at() and read_at() are safe
// from any thread at once and alongside the index methods, provided the extent they touch stays
// allocated meanwhile (ChunkStore takes an entry out of the index with take() and frees its extent
// with release_extent() only after its read is over; it writes a spill into an extent from
// allocate_extent() and only then insert()s or release_written()s it). put() writes the bytes
// itself, so its caller holds whatever lock it holds while the write runs; ChunkStore uses the
// three steps instead, writing without its mutex.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvf/protocol/chunk_key.h"
#include "kvf/protocol/kv_codec.h"
#include "kvf/protocol/status.h"
#include "kvf/store/arena_allocator.h"
#include "kvf/store/eviction_policy.h"

namespace kvf::store {

inline constexpr uint64_t kSsdBlock = 4096;  // extent and O_DIRECT alignment

enum class SsdIoMode : uint8_t {
  kAuto = 0,      // O_DIRECT where the file system takes it, else buffered (one warning)
  kDirect = 1,    // O_DIRECT or fail to open
  kBuffered = 2,  // page-cache I/O always
};
std::string_view ssd_io_mode_name(SsdIoMode mode);  // "auto", "direct", "buffered"

struct SsdTierOptions {
  std::string path;       // the tier's file (its directory must exist)
  uint64_t capacity = 0;  // bytes; rounded down to kSsdBlock, at least one block
  SsdIoMode io = SsdIoMode::kAuto;
  uint64_t bounce_bytes = 4 << 20;  // per bounce buffer; a multiple of kSsdBlock
  // How the file is opened: ::open when empty. Tests substitute one that refuses O_DIRECT with
  // EINVAL (as tmpfs did before Linux 6.6, and some FUSE file systems do) to exercise kAuto's
  // fallback where every local file system takes O_DIRECT.
  std::function<int(const char* path, int flags, mode_t mode)> open_file;
  // Called at the start of every write_at (so of every put and spill), on the writing thread, with
  // the file offset and length; a status other than Ok fails the write with it. Empty: nothing.
  // Tests make a spill slow (to see who waits for it) or fail (a dying disk) with it.
  std::function<Status(uint64_t offset, uint64_t length)> before_write;
};

struct SsdEntry {
  protocol::ChunkKey key;
  ArenaBlock extent;   // file offset and length (a multiple of kSsdBlock)
  uint64_t bytes = 0;  // the chunk's length
  uint64_t checksum = 0;
  protocol::ChunkKey model;
  protocol::KvCodec codec = protocol::KvCodec::kIdentity;
  uint64_t loads = 0;  // ChunkStore's EntryInfo::loads, kept with the entry
};

struct SsdTierStats {
  uint64_t capacity_bytes = 0;
  uint64_t bytes_used = 0;  // extents allocated: entries, taken ones and ones being written
  uint64_t bytes_free = 0;
  uint64_t largest_free_block = 0;
  uint64_t bytes_entries = 0;  // extents of indexed entries
  uint64_t bytes_taken = 0;    // extents of taken entries not yet released
  uint64_t bytes_writing = 0;  // extents allocated by allocate_extent, not yet inserted or released
  uint64_t entries = 0;
  uint64_t taken = 0;
  uint64_t writing = 0;
  // Counters. puts + restores == entries + evictions + erases + takes.
  uint64_t puts = 0;
  uint64_t evictions = 0;
  uint64_t erases = 0;
  uint64_t takes = 0;
  uint64_t restores = 0;
  uint64_t bytes_written = 0;
  uint64_t bytes_read = 0;
};

class SsdTier {
 public:
  // Creates or truncates the file, preallocates it and picks the I/O mode. Errors: kInvalidArgument
  // (no path, a capacity under one block, a bad bounce size, a path that is not a regular file),
  // kUnavailable (kDirect where the file system refuses O_DIRECT), kOutOfMemory (the disk cannot
  // hold the capacity), kInternal (any other system error, with errno's text).
  static Result<std::unique_ptr<SsdTier>> open(SsdTierOptions options);
  ~SsdTier();
  SsdTier(const SsdTier&) = delete;
  SsdTier& operator=(const SsdTier&) = delete;

  const std::string& path() const { return options_.path; }
  uint64_t capacity() const { return allocator_.capacity(); }
  bool direct() const { return direct_; }  // O_DIRECT in use
  std::string_view io_name() const { return direct_ ? "direct" : "buffered"; }

  // Writes `bytes` into a new extent (evicting the least recently used entries while it does not
  // fit) and indexes it. Errors: kAborted (the key is already here), kInvalidArgument (empty, or
  // larger than the tier), kOutOfMemory (no extent fits even with every entry evicted: the space is
  // held by taken entries and extents being written), and the write's errors (the extent is then freed and
  // nothing indexed; entries evicted for it stay evicted).
  Result<SsdEntry> put(const protocol::ChunkKey& key, std::span<const uint8_t> bytes, uint64_t checksum,
                       const protocol::ChunkKey& model, protocol::KvCodec codec, uint64_t loads = 0);
  // put in three steps, for an owner that writes without its lock: allocate_extent (evicting as
  // put does; put's errors but kAborted and the write's) -> write_at(extent.offset, bytes) with no
  // lock -> insert(entry with that extent) to index it, or release_written(extent) to free it.
  // Meanwhile the extent counts as writing (stats).
  Result<ArenaBlock> allocate_extent(uint64_t bytes);
  void insert(const SsdEntry& entry);  // the key must not be here (the owner's invariant)
  void release_written(const ArenaBlock& extent);
  const SsdEntry* find(const protocol::ChunkKey& key) const;
  bool contains(const protocol::ChunkKey& key) const { return find(key) != nullptr; }
  // Takes an entry out of the index and the eviction order but keeps its extent allocated, so that
  // it can be read without the owner's lock; then release_extent(e.extent), or restore(e) to put
  // it back (as the most recently used).
  std::optional<SsdEntry> take(const protocol::ChunkKey& key);
  void restore(const SsdEntry& entry);
  void release_extent(const ArenaBlock& extent);
  // Removes entries and frees their extents. erase_if visits every entry (O(entries)) and returns
  // the removed ones.
  bool erase(const protocol::ChunkKey& key);
  std::vector<SsdEntry> erase_if(const std::function<bool(const SsdEntry&)>& pred);
  std::vector<SsdEntry> clear();
  void for_each(const std::function<void(const SsdEntry&)>& visit) const;

  // Reads an entry's bytes into out (out.size() must be entry.bytes) and checks them against its
  // checksum (kVerifyFailed) unless `verify` is false.
  Status read(const SsdEntry& entry, std::span<uint8_t> out, bool verify = true);
  // Raw I/O at a file offset (a multiple of kSsdBlock); the tail of the last block is zero-filled
  // on write. For the bench's anchor and the tests.
  Status write_at(uint64_t offset, std::span<const uint8_t> bytes);
  Status read_at(uint64_t offset, std::span<uint8_t> out);

  SsdTierStats stats() const;
  // Checks the index, the eviction order and the allocator against each other. kInternal.
  Status audit() const;

 private:
  SsdTier(SsdTierOptions options, ArenaAllocator allocator, int fd, bool direct);
  std::unique_ptr<uint8_t, void (*)(void*)> take_bounce();
  void give_bounce(std::unique_ptr<uint8_t, void (*)(void*)> buffer);
  Status pwrite_all(const uint8_t* data, uint64_t length, uint64_t offset);
  Status pread_all(uint8_t* data, uint64_t length, uint64_t offset);
  Status io_error(const char* what, uint64_t offset, int err) const;

  SsdTierOptions options_;
  ArenaAllocator allocator_;
  int fd_ = -1;
  bool direct_ = false;
  std::unordered_map<protocol::ChunkKey, SsdEntry> index_;
  LruPolicy lru_;
  SsdTierStats s_;                          // index and allocator fields: the owner's lock
  std::atomic<uint64_t> bytes_written_{0};  // I/O counters: any thread
  std::atomic<uint64_t> bytes_read_{0};
  std::mutex bounce_mu_;
  std::vector<std::unique_ptr<uint8_t, void (*)(void*)>> bounces_;
};

}  // namespace kvf::store
