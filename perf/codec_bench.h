// kvfabric-codec-bench's pieces shared by its backends: the synthetic KV-like chunk, and the
// interface one way of running a codec implements (the CPU codecs in codec_bench_main.cpp; a GPU
// backend over kv_codec_cuda.h can live in its own file and be picked by an option). The harness
// times what a backend does, alternating it with the backend's own copy anchor. Not thread-safe:
// the harness gives each thread its own backend.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kvf/gpudirect/kv_codec.h"
#include "kvf/protocol/kv_codec.h"
#include "kvf/protocol/status.h"

namespace kvf::perf {

// Fills `raw` (geometry.raw_bytes()) with bf16 values shaped like a model's KV cache, from `seed`:
// keys normal per channel (each channel its own mean and spread; one channel in 32 an outlier with
// a larger mean and 1.5x the spread: the channel-wise outliers KIVI quantizes keys per channel
// for), values normal per token (each token its own spread, zero mean). For MLA (parts 1) the
// latent is made like keys. The same shapes as tests/unit/test_kv_codec.cpp's data; stronger
// outliers raise per-token int8/fp8 errors (a 6x-spread outlier channel: int8 K error 2.6 %).
void fill_kv_like(const protocol::KvChunkGeometry& geometry, uint64_t seed, std::span<uint8_t> raw);

// One way of running a codec over one chunk at a time. Buffers are the backend's own; `prepare`
// gives it the chunk (host bytes) and codec, then the harness times encode, decode and anchor.
class CodecBackend {
 public:
  virtual ~CodecBackend() = default;
  virtual std::string name() const = 0;  // e.g. "cpu"
  // Takes the codec and a copy of the chunk (whatever upload or allocation it needs, untimed).
  virtual Status prepare(const protocol::KvCodecParams& params, const protocol::KvChunkGeometry& geometry,
                         std::span<const uint8_t> raw) = 0;
  virtual Result<uint64_t> encode() = 0;  // the chunk; returns the encoded bytes
  virtual Status decode() = 0;            // the last encoded chunk, into the backend's decode buffer
  // A plain copy of the chunk's raw bytes on the same memory (memcpy here, a device copy on a GPU):
  // the figure the codec's throughput is read against.
  virtual Status anchor() = 0;
  // Host copies of the last encoded chunk and of the last decode's output (untimed; for the ratio,
  // the header's error estimates and compare_chunks).
  virtual Result<std::vector<uint8_t>> encoded_copy() = 0;
  virtual Result<std::vector<uint8_t>> decoded_copy() = 0;
};

}  // namespace kvf::perf
