#include "kvf/store/store_stats_fields.h"

#include <array>

namespace kvf::store {

namespace {

constexpr std::array<StoreStatsField, 50> kFields{{
    {"capacity_bytes", false, &StoreStats::capacity_bytes, "Bytes in the store arena."},
    {"bytes_used", false, &StoreStats::bytes_used,
     "Arena bytes allocated (entries, reservations, detached, promoting, spilling)."},
    {"bytes_free", false, &StoreStats::bytes_free, "Arena bytes free."},
    {"largest_free_block", false, &StoreStats::largest_free_block, "Largest free hole in the arena."},
    {"bytes_entries", false, &StoreStats::bytes_entries, "Arena bytes of committed, visible entries."},
    {"bytes_reserved", false, &StoreStats::bytes_reserved, "Arena bytes of reservations being written."},
    {"bytes_detached", false, &StoreStats::bytes_detached, "Arena bytes of cleared entries still leased."},
    {"bytes_promoting", false, &StoreStats::bytes_promoting, "Arena bytes being filled from the SSD tier."},
    {"bytes_spilling", false, &StoreStats::bytes_spilling,
     "Arena bytes of entries being written to the SSD tier (freed when written)."},
    {"entries", false, &StoreStats::entries, "Committed, visible entries."},
    {"reservations", false, &StoreStats::reservations, "Reservations being written."},
    {"promoting", false, &StoreStats::promoting, "Entries being read back from the SSD tier."},
    {"spilling", false, &StoreStats::spilling, "Entries being written to the SSD tier (evicted or demoted)."},
    {"detached", false, &StoreStats::detached, "Cleared entries kept until their leases end."},
    {"pinned", false, &StoreStats::pinned, "Pinned entries."},
    {"leased_entries", false, &StoreStats::leased_entries, "Entries with at least one lease."},
    {"protected_entries", false, &StoreStats::protected_entries,
     "Visible entries pinned, leased or being re-encoded."},
    {"evictable", false, &StoreStats::evictable, "Visible entries the eviction policy may pick."},
    {"active_leases", false, &StoreStats::active_leases, "Leases held by readers."},
    {"hits", true, &StoreStats::hits, "Chunks found in DRAM by lookup and acquire."},
    {"misses", true, &StoreStats::misses, "Lookups and acquires that stopped at a chunk stored in no tier."},
    {"reserves", true, &StoreStats::reserves, "Successful reservations."},
    {"inserts", true, &StoreStats::inserts, "Commits."},
    {"replacements", true, &StoreStats::replacements, "Entries re-encoded (commit_replacement)."},
    {"aborts", true, &StoreStats::aborts, "Reservations aborted by their writer."},
    {"expired_reservations", true, &StoreStats::expired_reservations,
     "Reservations freed because their writer missed the timeout."},
    {"dropped_reservations", true, &StoreStats::dropped_reservations,
     "Reservations freed because their writer disconnected."},
    {"evictions", true, &StoreStats::evictions, "Entries evicted or demoted from DRAM (spilled or dropped)."},
    {"cleared", true, &StoreStats::cleared, "Entries removed from DRAM by clear."},
    {"promotions", true, &StoreStats::promotions, "Entries read back from the SSD tier into DRAM."},
    {"leases_granted", true, &StoreStats::leases_granted, "Leases granted."},
    {"leases_released", true, &StoreStats::leases_released, "Leases released by their reader."},
    {"expired_leases", true, &StoreStats::expired_leases,
     "Leases ended because their reader missed the timeout."},
    {"dropped_leases", true, &StoreStats::dropped_leases, "Leases ended because their reader disconnected."},
    {"ssd_capacity_bytes", false, &StoreStats::ssd_capacity_bytes, "Bytes in the SSD tier's file."},
    {"ssd_bytes_used", false, &StoreStats::ssd_bytes_used, "SSD tier bytes allocated."},
    {"ssd_bytes_free", false, &StoreStats::ssd_bytes_free, "SSD tier bytes free."},
    {"ssd_bytes_entries", false, &StoreStats::ssd_bytes_entries, "SSD tier bytes of entries."},
    {"ssd_bytes_promoting", false, &StoreStats::ssd_bytes_promoting, "SSD tier bytes being read back."},
    {"ssd_bytes_spilling", false, &StoreStats::ssd_bytes_spilling, "SSD tier bytes being written."},
    {"ssd_entries", false, &StoreStats::ssd_entries, "Entries in the SSD tier."},
    {"ssd_hits", true, &StoreStats::ssd_hits, "Chunks found in the SSD tier by lookup and acquire."},
    {"ssd_misses", true, &StoreStats::ssd_misses,
     "Lookups and acquires the SSD tier could not serve either."},
    {"ssd_spills", true, &StoreStats::ssd_spills, "DRAM evictions and demotions written to the SSD tier."},
    {"ssd_spill_failures", true, &StoreStats::ssd_spill_failures,
     "DRAM evictions the SSD tier could not take (dropped)."},
    {"ssd_evictions", true, &StoreStats::ssd_evictions, "Entries the SSD tier evicted to make room."},
    {"ssd_cleared", true, &StoreStats::ssd_cleared, "Entries removed from the SSD tier by clear."},
    {"ssd_dropped", true, &StoreStats::ssd_dropped,
     "SSD entries dropped because their read back failed (checksum, I/O)."},
    {"ssd_bytes_written", true, &StoreStats::ssd_bytes_written, "Bytes written to the SSD tier."},
    {"ssd_bytes_read", true, &StoreStats::ssd_bytes_read, "Bytes read from the SSD tier."},
}};
// Every field of StoreStats is in the table (all of them are uint64_t).
static_assert(sizeof(StoreStats) == kFields.size() * sizeof(uint64_t), "a StoreStats field is missing here");

}  // namespace

std::span<const StoreStatsField> store_stats_fields() {
  return kFields;
}

std::vector<std::pair<std::string, uint64_t>> store_stats_to_pairs(const StoreStats& s) {
  std::vector<std::pair<std::string, uint64_t>> out;
  out.reserve(kFields.size());
  for (const auto& f : kFields) out.emplace_back(std::string(f.name), s.*f.member);
  return out;
}

StoreStats store_stats_from_pairs(std::span<const std::pair<std::string, uint64_t>> pairs) {
  StoreStats s;
  for (const auto& [name, value] : pairs) {
    for (const auto& f : kFields) {
      if (f.name == name) {
        s.*f.member = value;
        break;
      }
    }
  }
  return s;
}

}  // namespace kvf::store
