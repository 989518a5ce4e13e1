// kvfabric-perf client --mode layers --concurrent N: N request streams at once, each on its own
// control connection, source buffer and thread, through one transport and scheduler. This is the
// steady state of a decode engine fed by several prefills: one request's copies run while the
// previous one fills and drains, so the figure is the fabric's sustained bandwidth; a single
// stream (the default) also pays each request's first copy, last scatter and completion round
// trip.
// Thread rules: run_concurrent_streams blocks the calling thread and starts N - 1 more.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kvf/fabric/stream_sender.h"
#include "kvf/fabric/transfer_scheduler.h"
#include "kvf/gpudirect/memory_region.h"
#include "kvf/protocol/kv_layout.h"

namespace kvf::perf {

struct ConcurrentStreamsFigures {
  double seconds = 0;                   // first request started (all streams together) -> last done
  double aggregate_gbps = 0;            // every stream's bytes over `seconds`
  std::vector<double> request_seconds;  // every request, in completion order
  uint64_t bytes_verified = 0;          // with verify: what the receiver checked, all streams
};

// Each of `links` streams `iters` requests from its own `sources` entry (filled once per stream
// with its own seed before the clock starts), so links.size() == sources.size(); `source_blocks`
// as in PatternStreamOptions (empty: the pool in order). With `verify`
// every request must come back fully verified, or the run fails.
Result<ConcurrentStreamsFigures> run_concurrent_streams(
    std::vector<std::unique_ptr<fabric::PeerLink>>& links, fabric::Transport& transport,
    fabric::TransferScheduler& scheduler, const std::vector<gpudirect::MemoryRegion>& sources,
    const protocol::KvLayout& layout, uint64_t iters, bool verify, bool shuffle,
    const std::vector<uint32_t>& source_blocks, uint64_t& request_id, std::chrono::milliseconds timeout);

}  // namespace kvf::perf
