// PlacementPlanner: capacities hold, reuse and tolerance decide who gets DRAM and which codec,
// lossy entries are never offered better codecs, and the delay weight moves the plan between
// lossless and compressed.
#include <numeric>

#include "catch.h"
#include "kvf/store/placement_planner.h"

using kvf::protocol::KvCodec;
using kvf::protocol::Tier;
using kvf::store::kNotStored;
using kvf::store::PlacementState;
using kvf::store::PlannerConfig;
using kvf::store::PlannerEntry;

namespace {

constexpr uint64_t kGiB = 1ull << 30;

PlannerConfig node(uint64_t dram, uint64_t ssd, double weight) {
  PlannerConfig c;
  c.codecs = {{KvCodec::kIdentity, "identity", 1.0, 1.0, 0},
              {KvCodec::kInt8, "int8", 0.5, 0.99, 0},
              {KvCodec::kInt4, "int4", 0.25, 0.9, 0}};
  c.dram_bytes = dram;
  c.ssd_bytes = ssd;
  c.dram_bytes_per_second = 50e9;
  c.ssd_bytes_per_second = 2e9;
  c.delay_weight = weight;
  return c;
}

PlannerEntry entry(double reuse, double recompute = 0.5, uint64_t bytes = kGiB) {
  PlannerEntry e;
  e.raw_bytes = bytes;
  e.reuse = reuse;
  e.recompute_seconds = recompute;
  return e;
}

uint64_t bytes_in(const PlannerConfig& c, const std::vector<PlannerEntry>& entries,
                  const std::vector<PlacementState>& plan, Tier tier) {
  uint64_t sum = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    if (plan[i].codec != kNotStored && plan[i].tier == tier)
      sum += kvf::store::placement_bytes(c, entries[i], plan[i].codec);
  }
  return sum;
}

}  // namespace

TEST_CASE("the plan never uses more than the DRAM and SSD capacities") {
  const PlannerConfig c = node(3 * kGiB, 5 * kGiB, 10);
  std::vector<PlannerEntry> entries;
  for (int i = 0; i < 40; ++i)
    entries.push_back(entry(1.0 + i % 7, 0.5, kGiB / 2 + uint64_t(i) * (kGiB / 16)));
  kvf::store::PlanTotals totals;
  const auto plan = kvf::store::plan_placement(c, entries, &totals);
  REQUIRE(plan.size() == entries.size());
  CHECK(bytes_in(c, entries, plan, Tier::kDram) <= c.dram_bytes);
  CHECK(bytes_in(c, entries, plan, Tier::kSsd) <= c.ssd_bytes);
  CHECK(totals.dram_bytes == bytes_in(c, entries, plan, Tier::kDram));
  CHECK(totals.ssd_bytes == bytes_in(c, entries, plan, Tier::kSsd));
  // Room was short: something was left out or compressed.
  const bool any_compressed_or_dropped =
      std::any_of(plan.begin(), plan.end(), [](const PlacementState& p) { return p.codec != 0; });
  CHECK(any_compressed_or_dropped);
}

TEST_CASE("the most reused entry gets DRAM when only one fits") {
  const PlannerConfig c = node(kGiB, 0, 1);
  const std::vector<PlannerEntry> entries = {entry(2), entry(50), entry(5)};
  const auto plan = kvf::store::plan_placement(c, entries);
  CHECK(plan[1].codec != kNotStored);
  CHECK(plan[1].tier == Tier::kDram);
  // The other two share what is left only if compressed; the hottest is never the one dropped.
  CHECK(bytes_in(c, entries, plan, Tier::kDram) <= kGiB);
}

TEST_CASE("a tiny delay weight keeps entries lossless; a large one compresses to fit more") {
  const std::vector<PlannerEntry> entries = {entry(10), entry(10), entry(10), entry(10)};
  const auto lossless = kvf::store::plan_placement(node(4 * kGiB, 0, 0.01), entries);
  for (const auto& p : lossless) {
    CHECK((p.codec == kNotStored || p.codec == 0));
  }
  // Four 1 GiB entries in 1 GiB of DRAM: only int4 (0.25 GiB each) keeps them all.
  const auto compressed = kvf::store::plan_placement(node(kGiB, 0, 100), entries);
  for (const auto& p : compressed) {
    CHECK(p.codec == 2);
    CHECK(p.tier == Tier::kDram);
  }
}

TEST_CASE("entries without predicted reuse are not kept") {
  const auto plan =
      kvf::store::plan_placement(node(8 * kGiB, 8 * kGiB, 10), std::vector<PlannerEntry>{entry(0)});
  CHECK(plan[0].codec == kNotStored);
}

TEST_CASE("an entry held lossy is never offered a better codec") {
  PlannerEntry held = entry(100);
  held.current = PlacementState{2, Tier::kDram};  // int4
  const auto plan = kvf::store::plan_placement(node(8 * kGiB, 0, 0.01), std::vector<PlannerEntry>{held});
  CHECK((plan[0].codec == 2 || plan[0].codec == kNotStored));
}

TEST_CASE("entries that tolerate compression are the ones compressed") {
  // Room for one raw entry plus one int4: the tolerant entry takes the int4 slot.
  PlannerEntry tolerant = entry(10);
  tolerant.quality_scale = 0.05;
  PlannerEntry sensitive = entry(10);
  sensitive.quality_scale = 3.0;
  const auto plan = kvf::store::plan_placement(node(kGiB + kGiB / 4, 0, 0.5),
                                               std::vector<PlannerEntry>{sensitive, tolerant});
  CHECK(plan[1].codec == 2);
  CHECK(plan[0].codec == 0);
}

TEST_CASE("the SSD takes what DRAM cannot, when loading it beats recomputing") {
  // 1 GiB raw from a 2 GB/s SSD (0.54 s) loses to a 0.1 s recompute; int4 (0.13 s) does not win either.
  const auto cheap =
      kvf::store::plan_placement(node(0, 8 * kGiB, 1), std::vector<PlannerEntry>{entry(10, 0.1)});
  CHECK(cheap[0].codec == kNotStored);
  const auto costly =
      kvf::store::plan_placement(node(0, 8 * kGiB, 1), std::vector<PlannerEntry>{entry(10, 5.0)});
  CHECK(costly[0].codec != kNotStored);
  CHECK(costly[0].tier == Tier::kSsd);
}
