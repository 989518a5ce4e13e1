// chunk_checksum: the checksum kept with every stored chunk and checked by every reader (engines
// loading from the arena, the SSD tier's promotions, remote fetches), so all of them must compute it
// alike, on any host, with no seed of their own.
//
// Definition: a chunk of at most kChecksumSegmentBytes (1 MiB) hashes to its XXH3-64 (seed 0). A
// longer one is cut into 1 MiB segments (the last one shorter); it hashes to the XXH3-64, seeded with
// the chunk's length, of the segments' XXH3-64s written as little-endian u64s in order.
// Why segments: a chunk of 256 Llama-3-8B tokens is 32 MiB, which one core hashes at ~6 GB/s on the
// GPU machine while the GPU gathers it into the arena at ~50; the segments hash on several threads.
// Thread rules: pure functions, safe from any thread; the parallel one runs on the process's worker
// pool (parallel_for.h).
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvf::store {

inline constexpr uint64_t kChecksumSegmentBytes = uint64_t{1} << 20;

// On the calling thread only.
uint64_t chunk_checksum(const uint8_t* data, uint64_t length);
// The same value, the segments hashed on up to `threads` threads (0: default_parallel_threads()).
uint64_t chunk_checksum_parallel(const uint8_t* data, uint64_t length, size_t threads = 0);

}  // namespace kvf::store
