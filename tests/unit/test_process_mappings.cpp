// range_in_one_mapping against mappings the test makes and unmaps itself.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>

#include "../../fabric/process_mappings.h"
#include "catch.h"

using kvf::fabric::range_in_one_mapping;

TEST_CASE("range_in_one_mapping: inside one mapping, past its end, or in none") {
  const auto page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  // Three pages mapped, the last one unmapped again: a hole right after two mapped pages.
  auto* base = static_cast<uint8_t*>(
      mmap(nullptr, 3 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  REQUIRE(base != MAP_FAILED);
  REQUIRE(munmap(base + 2 * page, page) == 0);

  CHECK(range_in_one_mapping(base, 2 * page));
  CHECK(range_in_one_mapping(base + 100, 2 * page - 100));
  CHECK(range_in_one_mapping(base + 2 * page - 1, 1));
  CHECK_FALSE(range_in_one_mapping(base, 2 * page + 1));  // one byte into the hole
  CHECK_FALSE(range_in_one_mapping(base + 2 * page, 1));  // in the hole
  CHECK_FALSE(range_in_one_mapping(base, UINT64_MAX));    // wraps around
  CHECK_FALSE(range_in_one_mapping(base, 0));
  CHECK_FALSE(range_in_one_mapping(nullptr, 16));
  REQUIRE(munmap(base, 2 * page) == 0);
  CHECK_FALSE(range_in_one_mapping(base, page));  // gone
}
