// kvfabric-perf client --compute llama8b: the overlap run. A compute stream runs Llama-3-8B-shaped
// prefill GEMMs layer by layer while the fabric streams each layer as soon as its compute event
// fires (the transfer waits on the GPU; the host never blocks). Measured: one layer's transfer
// time with no compute, the compute alone, the compute with transfers, and the tail from the last
// layer's compute finishing to its LayerReady being sent.
#pragma once

#include <cstdint>

#include "kvf/fabric/stream_sender.h"
#include "kvf/fabric/transfer_scheduler.h"
#include "kvf/gpudirect/memory_region.h"
#include "kvf/protocol/kv_layout.h"

namespace kvf::perf {

struct OverlapFigures {
  double transfer_gbps = 0;             // the request alone, no compute
  double layer_transfer_us = 0;         // that request's time / layers
  double compute_alone_ms = 0;          // all layers' GEMMs, nothing else on the GPUs
  double compute_with_transfer_ms = 0;  // the same GEMMs while the layers stream
  double slowdown_pct = 0;
  double tail_us = 0;     // last layer's compute done -> last layer remotely complete and announced
  double tail_ratio = 0;  // tail_us / layer_transfer_us
};

// Medians over `iters` requests of each kind. `source` must be GPU memory on `device`.
Result<OverlapFigures> run_overlap(fabric::PeerLink& link, fabric::Transport& transport,
                                   fabric::TransferScheduler& scheduler,
                                   const gpudirect::MemoryRegion& source, const protocol::KvLayout& layout,
                                   int device, uint32_t tokens, uint64_t iters, bool shuffle,
                                   uint64_t& request_id);

}  // namespace kvf::perf
