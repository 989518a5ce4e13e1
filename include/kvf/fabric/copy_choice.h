// The cuda_ipc transport's choice, per put, between a direct copy into the peer's blocks and a
// staged one (CudaCopyMethod::kAdaptive). Direct copies start at once and land one copy after
// their data is ready, but SM peer writes of scattered 32 KiB blocks reach only ~0.8x of NVLink;
// staged copies (gather, one copy-engine copy per slot, the receiver scatters) carry more bytes
// per second but add a gather, a scatter and a message round trip to each chunk. So a put stages
// only when throughput is what counts: its data is ready now and earlier puts to the same peer
// are still copying (the link is the bottleneck). A put that waits for its layer's compute, or
// finds the link idle, goes direct: that keeps the last layer of an overlapped prefill one copy
// behind its compute. The transport asks the peer for staging the first time this says staged,
// and copies directly until the peer's offer has come.
//
// Threads: a pure function; any thread.
#pragma once

namespace kvf::fabric {

// What is known about one put when it is issued.
struct AdaptivePutState {
  bool peer_on_other_gpu = true;  // the destination blocks lie on another GPU than the source
  bool data_ready = true;         // the put waits for no event, or its event has already fired
  bool link_busy = false;         // earlier puts to this peer have not finished
  bool staging_refused = false;   // the peer offered no staging (or it could not be set up)
};

enum class AdaptivePath { kDirect, kStaged };

// `stage_same_gpu`: stage between processes on one GPU too (a test knob: there staging only adds
// copies).
AdaptivePath choose_adaptive_path(const AdaptivePutState& put, bool stage_same_gpu = false);

}  // namespace kvf::fabric
