// ArenaAllocator: best fit, coalescing, refusal of bad frees, and a randomized run against a
// shadow map of the arena.
#include <map>
#include <random>
#include <vector>

#include "catch.h"
#include "kvf/store/arena_allocator.h"

using namespace kvf;
using namespace kvf::store;

TEST_CASE("allocator refuses alignments that are not powers of two and arenas smaller than one block") {
  REQUIRE(ArenaAllocator::create(4096, 0).status().code() == ErrorCode::kInvalidArgument);
  REQUIRE(ArenaAllocator::create(4096, 48).status().code() == ErrorCode::kInvalidArgument);
  REQUIRE(ArenaAllocator::create(100, 256).status().code() == ErrorCode::kInvalidArgument);
  auto a = ArenaAllocator::create(1000, 256);
  REQUIRE(a.ok());
  REQUIRE(a->capacity() == 768);  // rounded down to the alignment
}

TEST_CASE("allocations are aligned, rounded up, and freeing them all leaves one range") {
  auto a = ArenaAllocator::create(1 << 20, 256).value();
  auto x = a.allocate(1);
  auto y = a.allocate(300);
  auto z = a.allocate(256);
  REQUIRE(x);
  REQUIRE(y);
  REQUIRE(z);
  REQUIRE(x->length == 256);
  REQUIRE(y->length == 512);
  REQUIRE(z->length == 256);
  for (auto b : {*x, *y, *z}) REQUIRE(b.offset % 256 == 0);
  REQUIRE(a.bytes_used() == 1024);
  REQUIRE_FALSE(a.allocate(0));
  REQUIRE_FALSE(a.allocate((1 << 20) + 1));
  REQUIRE(a.free(*y).ok());
  REQUIRE(a.free(*x).ok());
  REQUIRE(a.free(*z).ok());
  REQUIRE(a.free_ranges() == 1);
  REQUIRE(a.bytes_free() == a.capacity());
  REQUIRE(a.largest_free() == a.capacity());
}

TEST_CASE("best fit takes the smallest hole that holds the request") {
  auto a = ArenaAllocator::create(64 * 256, 256).value();
  std::vector<ArenaBlock> blocks;
  for (uint64_t size : {4, 1, 2, 1, 8, 1}) blocks.push_back(a.allocate(size * 256).value());
  // Holes of 4, 2 and 8 blocks, separated by the 1-block allocations.
  REQUIRE(a.free(blocks[0]).ok());
  REQUIRE(a.free(blocks[2]).ok());
  REQUIRE(a.free(blocks[4]).ok());
  auto b = a.allocate(2 * 256);
  REQUIRE(b);
  REQUIRE(b->offset == blocks[2].offset);
  auto c = a.allocate(3 * 256);
  REQUIRE(c);
  REQUIRE(c->offset == blocks[0].offset);
}

TEST_CASE("a double free or a block outside the arena is refused and changes nothing") {
  auto a = ArenaAllocator::create(16 * 256, 256).value();
  auto x = a.allocate(512).value();
  auto y = a.allocate(512).value();
  REQUIRE(a.free(x).ok());
  uint64_t before = a.bytes_free();
  REQUIRE(a.free(x).code() == ErrorCode::kInternal);
  REQUIRE(a.free(ArenaBlock{x.offset + 256, 512}).code() == ErrorCode::kInternal);  // overlaps the hole
  REQUIRE(a.free(ArenaBlock{16 * 256, 256}).code() == ErrorCode::kInternal);
  REQUIRE(a.free(ArenaBlock{100, 256}).code() == ErrorCode::kInternal);
  REQUIRE(a.free(ArenaBlock{0, 0}).code() == ErrorCode::kInternal);
  REQUIRE(a.bytes_free() == before);
  REQUIRE(a.free(y).ok());
  REQUIRE(a.free_ranges() == 1);
}

TEST_CASE("random allocate and free never hand out overlapping blocks and coalesce completely") {
  constexpr uint64_t kAlign = 64;
  constexpr uint64_t kCapacity = 4096 * kAlign;
  auto a = ArenaAllocator::create(kCapacity, kAlign).value();
  std::mt19937_64 rng(42);
  std::map<uint64_t, uint64_t> live;  // offset -> length
  uint64_t used = 0;
  for (int step = 0; step < 20000; ++step) {
    bool do_alloc = live.empty() || rng() % 100 < 55;
    if (do_alloc) {
      uint64_t bytes = 1 + rng() % (40 * kAlign);
      auto b = a.allocate(bytes);
      if (!b) {
        REQUIRE(a.largest_free() < a.round_up(bytes));
        continue;
      }
      REQUIRE(b->length == a.round_up(bytes));
      auto next = live.lower_bound(b->offset);
      if (next != live.end()) REQUIRE(b->offset + b->length <= next->first);
      if (next != live.begin()) {
        auto prev = std::prev(next);
        REQUIRE(prev->first + prev->second <= b->offset);
      }
      live.emplace(b->offset, b->length);
      used += b->length;
    } else {
      auto it = live.begin();
      std::advance(it, static_cast<long>(rng() % live.size()));
      REQUIRE(a.free(ArenaBlock{it->first, it->second}).ok());
      used -= it->second;
      live.erase(it);
    }
    REQUIRE(a.bytes_used() == used);
  }
  for (auto [offset, length] : live) REQUIRE(a.free(ArenaBlock{offset, length}).ok());
  REQUIRE(a.free_ranges() == 1);
  REQUIRE(a.bytes_free() == kCapacity);
}
