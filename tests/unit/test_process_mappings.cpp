// mapping_containing and MappingBounds::holds against mappings the test makes and unmaps itself.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>

#include "../../fabric/process_mappings.h"
#include "catch.h"

using kvf::fabric::mapping_containing;

TEST_CASE("mapping_containing: the mapping that holds an address, its end, holes") {
  const auto page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  // Three pages mapped, the last one unmapped again: a hole right after two mapped pages.
  auto* base = static_cast<uint8_t*>(
      mmap(nullptr, 3 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  REQUIRE(base != MAP_FAILED);
  REQUIRE(munmap(base + 2 * page, page) == 0);

  auto m = mapping_containing(base + 100);
  REQUIRE(m.has_value());
  CHECK(m->end == reinterpret_cast<uintptr_t>(base + 2 * page));  // ends at the hole
  CHECK(m->start <= reinterpret_cast<uintptr_t>(base));           // (may merge with a neighbour)
  CHECK(m->holds(base, 2 * page));
  CHECK(m->holds(base + 100, 2 * page - 100));
  CHECK(m->holds(base + 2 * page - 1, 1));
  CHECK_FALSE(m->holds(base, 2 * page + 1));  // one byte into the hole
  CHECK_FALSE(m->holds(base + 2 * page, 1));  // in the hole
  CHECK_FALSE(m->holds(base, UINT64_MAX));    // far past the end, no wrap-around
  CHECK_FALSE(m->holds(base, 0));
  CHECK_FALSE(mapping_containing(base + 2 * page).has_value());
  CHECK_FALSE(mapping_containing(nullptr).has_value());
  REQUIRE(munmap(base, 2 * page) == 0);
  CHECK_FALSE(mapping_containing(base).has_value());  // gone
}
