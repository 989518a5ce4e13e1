// SsdTier alone: bytes round-trip through the file (random data, chunk sizes that are and are not
// whole blocks, aligned and unaligned caller buffers, poisoned destinations) in O_DIRECT mode (a
// file on the temp directory's file system, ext4 here; /dev/shm too, tmpfs takes O_DIRECT since
// Linux 6.6), in the buffered fallback (an opener that refuses O_DIRECT with EINVAL as tmpfs did
// before 6.6) and in buffered mode on request; a full tier evicts its least recently spilled
// entries; a corrupted or truncated file is an error, not wrong bytes; take/restore/release and
// clear keep the allocator, index and counters in agreement (audit).
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "catch.h"
#include "kvf/store/chunk_store.h"
#include "kvf/store/ssd_tier.h"

using namespace kvf;
using namespace kvf::store;
using protocol::ChunkKey;
using protocol::KvCodec;

namespace {

// A file name of this test process under `dir`, unique per call.
std::string scratch(const std::string& dir) {
  static std::atomic<int> n{0};
  return dir + "/kvf-ssd-tier-test-" + std::to_string(::getpid()) + "-" + std::to_string(n++);
}

std::string temp_dir() {
  return std::filesystem::temp_directory_path().string();
}

ChunkKey key(uint64_t i) {
  return ChunkKey{0xd15c0000 + i, i * 0x9E3779B97F4A7C15ull + 7};
}

std::vector<uint8_t> random_bytes(uint64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> out(n);
  for (auto& b : out) b = static_cast<uint8_t>(rng());
  return out;
}

// A 4 KiB-aligned buffer of n bytes (plus slack), offset by `misalign` bytes.
struct Buffer {
  explicit Buffer(uint64_t n, uint64_t misalign = 0) : size(n) {
    raw = static_cast<uint8_t*>(std::aligned_alloc(kSsdBlock, ((n + misalign) / kSsdBlock + 2) * kSsdBlock));
    data = raw + misalign;
  }
  ~Buffer() { std::free(raw); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  std::span<uint8_t> span() { return {data, static_cast<size_t>(size)}; }
  uint8_t* raw = nullptr;
  uint8_t* data = nullptr;
  uint64_t size = 0;
};

// Opens like a file system without O_DIRECT support: EINVAL for O_DIRECT, as tmpfs before 6.6.
int refuse_direct(const char* path, int flags, mode_t mode) {
  if ((flags & O_DIRECT) != 0) {
    errno = EINVAL;
    return -1;
  }
  return ::open(path, flags, mode);
}

std::unique_ptr<SsdTier> open_tier(const std::string& path, uint64_t capacity,
                                   SsdIoMode io = SsdIoMode::kAuto, bool refusing = false) {
  SsdTierOptions options;
  options.path = path;
  options.capacity = capacity;
  options.io = io;
  if (refusing) options.open_file = refuse_direct;
  options.bounce_bytes = 64 << 10;  // small, so that multi-piece bounce transfers are exercised
  auto tier = SsdTier::open(options);
  INFO(tier.status().to_string());
  REQUIRE(tier.ok());
  return std::move(tier.value());
}

void require_audit(const SsdTier& tier) {
  Status s = tier.audit();
  INFO(s.to_string());
  REQUIRE(s.ok());
}

// Puts chunks of several sizes, reads them back into poisoned buffers (aligned and not), checks.
void round_trip(SsdTier& tier) {
  const std::vector<uint64_t> sizes = {1, 100, 4096, 4097, 65536, 100000, 200000, 1 << 20};
  uint64_t i = 0;
  for (uint64_t size : sizes) {
    for (uint64_t src_misalign : {uint64_t{0}, uint64_t{3}}) {
      const ChunkKey k = key(i);
      const auto data = random_bytes(size, i + 1);
      Buffer src(size, src_misalign);
      std::memcpy(src.data, data.data(), size);
      auto put = tier.put(k, src.span(), chunk_checksum(data.data(), size), key(1000), KvCodec::kInt8);
      INFO("size " << size << " misalign " << src_misalign << ": " << put.status().to_string());
      REQUIRE(put.ok());
      CHECK(put->extent.offset % kSsdBlock == 0);
      CHECK(put->extent.length == (size + kSsdBlock - 1) / kSsdBlock * kSsdBlock);
      for (uint64_t dst_misalign : {uint64_t{0}, uint64_t{1}, uint64_t{512}}) {
        Buffer dst(size, dst_misalign);
        std::memset(dst.raw, 0xA5, (size + dst_misalign) / kSsdBlock * kSsdBlock + kSsdBlock);
        const SsdEntry* e = tier.find(k);
        REQUIRE(e != nullptr);
        CHECK(e->codec == KvCodec::kInt8);
        CHECK(e->model == key(1000));
        Status read = tier.read(*e, dst.span());
        INFO("read into misalignment " << dst_misalign << ": " << read.to_string());
        REQUIRE(read.ok());
        REQUIRE(std::memcmp(dst.data, data.data(), size) == 0);
        // Nothing past the chunk was written (the tail went through a bounce buffer).
        CHECK(dst.data[size] == 0xA5);
      }
      ++i;
    }
  }
  require_audit(tier);
  CHECK(tier.stats().entries == i);
}

}  // namespace

TEST_CASE("ssd tier: O_DIRECT on the temp directory's file system round-trips random bytes") {
  const std::string path = scratch(temp_dir());
  auto tier = open_tier(path, 16 << 20);
  CHECK(std::filesystem::file_size(path) == 16u << 20);  // preallocated
  if (!tier->direct()) WARN(temp_dir() << " refuses O_DIRECT here; the buffered path ran instead");
  round_trip(*tier);
  const SsdTierStats s = tier->stats();
  CHECK(s.bytes_written >= s.bytes_entries);
  CHECK(s.bytes_read > 0);
  tier.reset();
  CHECK(!std::filesystem::exists(path));  // the tier removes its file
}

TEST_CASE(
    "ssd tier: where the file system refuses O_DIRECT, auto falls back to buffered I/O and direct refuses") {
  const std::string path = scratch(temp_dir());
  {
    auto tier = open_tier(path, 8 << 20, SsdIoMode::kAuto, true);
    CHECK(!tier->direct());
    CHECK(tier->io_name() == "buffered");
    round_trip(*tier);
  }
  SsdTierOptions options;
  options.path = path;
  options.capacity = 1 << 20;
  options.io = SsdIoMode::kDirect;
  options.open_file = refuse_direct;
  auto refused = SsdTier::open(options);
  REQUIRE(!refused.ok());
  CHECK(refused.status().code() == ErrorCode::kUnavailable);
  CHECK(refused.status().message().find(path) != std::string::npos);
  CHECK(refused.status().message().find("refuses O_DIRECT") != std::string::npos);
  CHECK(!std::filesystem::exists(path));
}

TEST_CASE("ssd tier: /dev/shm (tmpfs) round-trips in whichever mode this kernel gives it") {
  if (!std::filesystem::is_directory("/dev/shm")) {
    WARN("no /dev/shm here");
    return;
  }
  auto tier = open_tier(scratch("/dev/shm"), 8 << 20);
  INFO("tmpfs I/O: " << tier->io_name());
  round_trip(*tier);
}

TEST_CASE("ssd tier: buffered mode on request") {
  auto tier = open_tier(scratch(temp_dir()), 16 << 20, SsdIoMode::kBuffered);
  CHECK(!tier->direct());
  round_trip(*tier);
}

TEST_CASE("ssd tier: a full tier evicts its least recently spilled entries") {
  auto tier = open_tier(scratch(temp_dir()), 64 << 10);  // 16 blocks
  const auto data = random_bytes(10000, 5);              // 3 blocks each: 5 fit
  const uint64_t sum = chunk_checksum(data.data(), data.size());
  for (uint64_t i = 0; i < 8; ++i) {
    REQUIRE(tier->put(key(i), data, sum, {}, KvCodec::kIdentity).ok());
    require_audit(*tier);
  }
  for (uint64_t i = 0; i < 3; ++i) CHECK(!tier->contains(key(i)));
  for (uint64_t i = 3; i < 8; ++i) CHECK(tier->contains(key(i)));
  SsdTierStats s = tier->stats();
  CHECK(s.evictions == 3);
  CHECK(s.entries == 5);
  CHECK(s.bytes_entries == 5 * 3 * kSsdBlock);
  // A taken entry's extent is not reused or evicted until released.
  auto taken = tier->take(key(3));
  REQUIRE(taken);
  CHECK(!tier->contains(key(3)));
  REQUIRE(tier->put(key(8), data, sum, {}, KvCodec::kIdentity).ok());  // evicts key 4, not 3's extent
  CHECK(!tier->contains(key(4)));
  Buffer out(data.size());
  REQUIRE(tier->read(*taken, out.span()).ok());
  CHECK(std::memcmp(out.data, data.data(), data.size()) == 0);
  require_audit(*tier);
  tier->restore(*taken);
  CHECK(tier->contains(key(3)));
  require_audit(*tier);
  // A chunk larger than the tier is refused; one that fits only with everything taken is kOutOfMemory.
  auto big = random_bytes((64 << 10) + 1, 6);
  CHECK(tier->put(key(20), big, 0, {}, KvCodec::kIdentity).status().code() == ErrorCode::kInvalidArgument);
  std::vector<SsdEntry> held;
  for (uint64_t i = 0; i < 20; ++i) {
    if (auto t = tier->take(key(i))) held.push_back(*t);
  }
  CHECK(tier->put(key(21), data, sum, {}, KvCodec::kIdentity).status().code() == ErrorCode::kOutOfMemory);
  for (const auto& e : held) tier->release_extent(e.extent);
  require_audit(*tier);
  CHECK(tier->stats().bytes_used == 0);
  CHECK(tier->put(key(3), data, sum, {}, KvCodec::kIdentity).ok());
  CHECK(tier->put(key(3), data, sum, {}, KvCodec::kIdentity).status().code() == ErrorCode::kAborted);
}

TEST_CASE("ssd tier: a corrupted file is kVerifyFailed, a truncated one a short-read error") {
  for (SsdIoMode io : {SsdIoMode::kAuto, SsdIoMode::kBuffered}) {
    const std::string path = scratch(temp_dir());
    auto tier = open_tier(path, 1 << 20, io);
    const auto data = random_bytes(50000, 9);
    auto put = tier->put(key(1), data, chunk_checksum(data.data(), data.size()), {}, KvCodec::kIdentity);
    REQUIRE(put.ok());
    // Another writer flips one byte in the middle of the chunk's extent.
    const int fd = ::open(path.c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    uint8_t byte = static_cast<uint8_t>(data[25000] ^ 0x40);
    REQUIRE(::pwrite(fd, &byte, 1, static_cast<off_t>(put->extent.offset + 25000)) == 1);
    Buffer out(data.size());
    Status st = tier->read(*tier->find(key(1)), out.span());
    CHECK(st.code() == ErrorCode::kVerifyFailed);
    CHECK(st.message().find(path) != std::string::npos);
    CHECK(tier->read(*tier->find(key(1)), out.span(), false).ok());  // unverified: the bad bytes
    CHECK(out.data[25000] == byte);
    // The file cut short under the tier: a clear error naming the path.
    REQUIRE(::ftruncate(fd, static_cast<off_t>(put->extent.offset + 8192)) == 0);
    ::close(fd);
    st = tier->read(*tier->find(key(1)), out.span());
    CHECK(st.code() == ErrorCode::kInternal);
    CHECK(st.message().find("short read") != std::string::npos);
    CHECK(st.message().find(path) != std::string::npos);
  }
}

TEST_CASE("ssd tier: raw writes and reads at block offsets; erase_if and clear free everything") {
  auto tier = open_tier(scratch(temp_dir()), 4 << 20);
  const auto data = random_bytes(3 * kSsdBlock + 17, 11);
  REQUIRE(tier->write_at(8 * kSsdBlock, data).ok());
  Buffer out(data.size(), 5);
  REQUIRE(tier->read_at(8 * kSsdBlock, out.span()).ok());
  CHECK(std::memcmp(out.data, data.data(), data.size()) == 0);
  CHECK(tier->write_at(100, data).code() == ErrorCode::kInvalidArgument);           // not a block offset
  CHECK(tier->read_at(4 << 20, out.span()).code() == ErrorCode::kInvalidArgument);  // past the end

  for (uint64_t i = 0; i < 10; ++i) {
    REQUIRE(tier->put(key(i), data, 0, i % 2 == 0 ? key(500) : key(501), KvCodec::kIdentity).ok());
  }
  auto removed = tier->erase_if([](const SsdEntry& e) { return e.model == key(500); });
  CHECK(removed.size() == 5);
  CHECK(tier->stats().entries == 5);
  CHECK(tier->erase(key(1)));
  CHECK(!tier->erase(key(1)));
  CHECK(tier->clear().size() == 4);
  require_audit(*tier);
  const SsdTierStats s = tier->stats();
  CHECK(s.bytes_used == 0);
  CHECK(s.erases == 10);
}

TEST_CASE("ssd tier: bad options are refused with the reason") {
  SsdTierOptions options;
  CHECK(SsdTier::open(options).status().code() == ErrorCode::kInvalidArgument);  // no path
  options.path = scratch(temp_dir());
  options.capacity = 100;  // under one block
  CHECK(SsdTier::open(options).status().code() == ErrorCode::kInvalidArgument);
  options.capacity = 1 << 20;
  options.bounce_bytes = 1000;
  CHECK(SsdTier::open(options).status().code() == ErrorCode::kInvalidArgument);
  options.bounce_bytes = 1 << 20;
  options.path = temp_dir();  // a directory
  auto dir = SsdTier::open(options);
  CHECK(dir.status().code() == ErrorCode::kInvalidArgument);
  CHECK(dir.status().message().find("not a regular file") != std::string::npos);
  options.path = temp_dir() + "/no-such-directory-kvf/tier";
  CHECK(SsdTier::open(options).status().code() == ErrorCode::kInternal);
}

TEST_CASE("ssd tier: put in three steps (allocate_extent, write_at, insert or release_written)") {
  auto tier = open_tier(scratch(temp_dir()), 64 << 10);  // 16 blocks
  const auto data = random_bytes(10000, 9);              // 3 blocks each
  const uint64_t sum = chunk_checksum(data.data(), data.size());
  auto extent = tier->allocate_extent(data.size());
  REQUIRE(extent.ok());
  CHECK(extent->length == 3 * kSsdBlock);
  SsdTierStats s = tier->stats();
  CHECK(s.writing == 1);
  CHECK(s.bytes_writing == 3 * kSsdBlock);
  CHECK(s.bytes_used == 3 * kSsdBlock);
  CHECK(s.entries == 0);
  require_audit(*tier);
  REQUIRE(tier->write_at(extent->offset, data).ok());
  tier->insert(SsdEntry{key(1), extent.value(), data.size(), sum, key(2), KvCodec::kFp8, 42});
  s = tier->stats();
  CHECK(s.writing == 0);
  CHECK(s.bytes_writing == 0);
  CHECK(s.entries == 1);
  CHECK(s.puts == 1);
  const SsdEntry* e = tier->find(key(1));
  REQUIRE(e != nullptr);
  CHECK(e->loads == 42);
  CHECK(e->codec == KvCodec::kFp8);
  std::vector<uint8_t> back(data.size());
  REQUIRE(tier->read(*e, back).ok());
  CHECK(back == data);
  require_audit(*tier);
  // An extent being written is neither evicted nor reused: 4 more of 3 blocks fit, a fifth
  // evicts key 1 (an entry), never the extent held for writing.
  auto held = tier->allocate_extent(data.size());
  REQUIRE(held.ok());
  for (uint64_t i = 10; i < 14; ++i) REQUIRE(tier->put(key(i), data, sum, {}, KvCodec::kIdentity).ok());
  CHECK_FALSE(tier->contains(key(1)));
  for (uint64_t i = 10; i < 14; ++i) CHECK(tier->contains(key(i)));
  require_audit(*tier);
  tier->release_written(held.value());
  s = tier->stats();
  CHECK(s.writing == 0);
  CHECK(s.bytes_used == 4 * 3 * kSsdBlock);
  require_audit(*tier);
  // Nothing fits when every block is held for writing.
  std::vector<ArenaBlock> all;
  tier->clear();
  for (int i = 0; i < 5; ++i) {
    auto x = tier->allocate_extent(data.size());
    REQUIRE(x.ok());
    all.push_back(x.value());
  }
  CHECK(tier->allocate_extent(data.size()).status().code() == ErrorCode::kOutOfMemory);
  CHECK(tier->allocate_extent(0).status().code() == ErrorCode::kInvalidArgument);
  for (const auto& x : all) tier->release_written(x);
  CHECK(tier->stats().bytes_used == 0);
  require_audit(*tier);
}
