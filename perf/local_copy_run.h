// kvfabric-perf local: moves one KV request between a GPU's paged blocks and contiguous pinned
// host memory inside this process (the offload path of the prefix store): gather (GPU paged ->
// pinned) or scatter (pinned -> GPU paged), one SegmentCopier launch per request, timed with CUDA
// events; --verify checks every byte against the CPU version of the same copy.
#pragma once

#include <cxxopts.hpp>

namespace kvf::perf {

// Returns the process exit code (0 ok, 1 failure, 2 bad arguments / no GPU).
int run_local_copy(const cxxopts::ParseResult& args);

}  // namespace kvf::perf
