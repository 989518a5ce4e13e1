// The store arena in POSIX shared memory: another process maps it and writes a reservation's
// bytes in place, the store commits them, and a third process reads them under a lease: the
// chunk never passes through the store's own copies.
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "catch.h"
#include "kvf/store/chunk_store.h"

using namespace kvf;
using namespace kvf::store;
using protocol::ChunkKey;

namespace {

std::vector<uint8_t> content(uint64_t bytes) {
  std::vector<uint8_t> out(bytes);
  for (uint64_t i = 0; i < bytes; ++i) out[i] = static_cast<uint8_t>((i * 131) ^ (i >> 9));
  return out;
}

// Runs `body` in a child process that maps the arena by name; returns its exit status.
template <typename Body>
int in_child(const std::string& name, Body body) {
  pid_t pid = fork();
  if (pid == 0) {
    auto mapped = gpudirect::MemoryRegion::open_shared(nullptr, name);
    _exit(mapped.ok() ? body(mapped.value()) : 3);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 100;
}

}  // namespace

TEST_CASE("another process writes a reservation through the shared arena and a third reads it") {
  std::string name = "/kvf-test-store-" + std::to_string(getpid());
  auto arena = gpudirect::MemoryRegion::create_shared(nullptr, name, 1 << 20);
  REQUIRE(arena.ok());
  auto created = ChunkStore::create(std::move(arena.value()));
  REQUIRE(created.ok());
  ChunkStore& store = *created.value();
  REQUIRE(store.arena().kind() == protocol::MemoryKind::kSharedMemory);

  const ChunkKey key{1, 2};
  const auto data = content(300000);
  auto r = store.reserve(key, data.size(), 42);
  REQUIRE(r.ok());
  const uint64_t offset = r->offset;
  int wrote = in_child(name, [&](gpudirect::MemoryRegion& mapped) {
    if (mapped.size() < offset + data.size()) return 4;
    std::copy(data.begin(), data.end(), mapped.data() + offset);
    return 0;
  });
  REQUIRE(wrote == 0);
  REQUIRE(store.commit(key, r->id).ok());

  auto lease = store.acquire(key, 43);
  REQUIRE(lease.ok());
  REQUIRE(lease->checksum == chunk_checksum(data.data(), data.size()));
  const Lease l = lease.value();
  int read = in_child(name, [&](gpudirect::MemoryRegion& mapped) {
    return chunk_checksum(mapped.data() + l.offset, l.length) == l.checksum ? 0 : 5;
  });
  REQUIRE(read == 0);
  REQUIRE(store.release(l.id).ok());
}
