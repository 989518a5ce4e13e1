// kvfabric-perf's layer streams through a KV codec (--transport ucx_staged --codec int8|fp8|identity):
// the data and its check. A lossy codec changes the bytes, so the receiver cannot check them against
// the raw stream pattern; instead the sender fills its blocks with random finite bf16 values drawn
// from (seed, layer, block, part), and the receiver, which lands them in a poisoned pool of its own,
// checks that every block equals the CPU codec's decode of its encode of those values, exactly
// (the codecs are deterministic). The server answers a client's "was request R right?" on a small
// side port of its own (CodecVerifyServer) because a StreamResult goes out before the server can
// look at the bytes; the client learns the port and the server's codec from the server's name.
// Free functions and one class; see each for its threads.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kvf/fabric/control_channel.h"
#include "kvf/fabric/stream_pattern.h"
#include "kvf/fabric/stream_receiver.h"
#include "kvf/gpudirect/memory_region.h"
#include "kvf/protocol/kv_codec.h"
#include "kvf/protocol/kv_layout.h"

namespace kvf::perf {

// Random finite bf16 values, deterministic in the key: magnitudes in [2^-7, 2), one value in 32 an
// outlier 16x larger, about one row (of `row_bytes`) in 61 all zeros. `bytes` must be whole rows.
void fill_kv_values(uint8_t* dst, uint64_t bytes, uint32_t row_bytes, const fabric::PatternKey& key);

// What a receiver must hold for that block part: decode(encode(values)) with `codec` over rows of
// `row_bytes` (identity: the values). Uses the CPU codec (gpudirect/kv_codec.h).
Status expected_kv_values(protocol::KvCodec codec, uint32_t row_bytes, const fabric::PatternKey& key,
                          uint64_t bytes, std::vector<uint8_t>& out, std::vector<uint8_t>& scratch);

// Fills layer `layer` of `source` (host memory) with fill_kv_values for every block and part.
Status fill_kv_layer(const gpudirect::MemoryRegion& source, const protocol::KvLayout& layout, uint32_t layer,
                     uint64_t seed, uint32_t row_bytes);

// The hello name a codec-checking server gives itself, and what a client reads back from it.
struct CodecServerInfo {
  protocol::KvCodec codec = protocol::KvCodec::kIdentity;
  uint32_t row_bytes = 0;
  uint16_t verify_port = 0;
};
std::string codec_server_name(const CodecServerInfo& info);
std::optional<CodecServerInfo> parse_codec_server_name(const std::string& name);

// The server side: an engine pool (EnginePool) over one host region of `layout`, poisoned and
// handed out whole to one request at a time (blocks shuffled by the request id), every finished
// stream checked on the receiver's worker thread, and a control port that answers
// RunRequest{run_id = request id} with RunResult{code, message} once that request is checked.
class CodecVerifyServer {
 public:
  static Result<std::unique_ptr<CodecVerifyServer>> start(std::shared_ptr<gpudirect::UcxContext> ucx,
                                                          const protocol::KvLayoutDesc& layout,
                                                          protocol::KvCodec codec, uint32_t row_bytes,
                                                          const std::string& host);
  ~CodecVerifyServer();

  uint16_t port() const;
  const CodecServerInfo& info() const { return info_; }
  // For StreamReceiverOptions::pool.
  fabric::EnginePool pool();
  // Call from StreamReceiverOptions::on_stream_done: checks a successful stream's blocks (the seed
  // travels in the offer's context) and frees the pool.
  void stream_done(const fabric::StreamReport& report);

 private:
  CodecVerifyServer() = default;
  std::vector<uint32_t> allocate(uint64_t request_id, uint32_t n);
  void release();
  Status check(const fabric::StreamReport& report);
  void record(uint64_t request_id, const Status& outcome);
  void answer(const std::shared_ptr<fabric::ControlConnection>& connection, uint64_t request_id);

  CodecServerInfo info_;
  std::optional<protocol::KvLayout> layout_;
  std::optional<gpudirect::MemoryRegion> region_;
  std::unique_ptr<fabric::ControlContext> control_;
  std::unique_ptr<fabric::ControlServer> server_;
  std::mutex mutex_;
  std::condition_variable freed_;
  bool busy_ = false;
  std::map<uint64_t, Status> outcomes_;  // by request id (the latest 1024)
  std::multimap<uint64_t, std::weak_ptr<fabric::ControlConnection>> waiting_;
  std::vector<std::shared_ptr<fabric::ControlConnection>> connections_;
};

// The client side: asks the server whether request `request_id` landed right (waits for its check).
Status query_codec_check(const std::string& host, uint16_t port, uint64_t request_id,
                         std::chrono::milliseconds timeout, std::string* message);

// `kvfabric-perf codec`: the row codec's speed on one thread (encode_rows and decode_rows over
// `bytes` of random KV values in runs of `run_bytes`, the transport's piece size), in GB/s of raw
// bytes per second of the thread's CPU time, the best of `iters` passes; memcpy of the same runs
// beside it.
struct RowCodecSpeed {
  double encode_gbps = 0;
  double decode_gbps = 0;
  double memcpy_gbps = 0;
};
Result<RowCodecSpeed> measure_row_codec(protocol::KvCodec codec, uint32_t row_bytes, uint64_t bytes,
                                        uint64_t run_bytes, uint32_t iters);

// The seed travels in the stream's context: 8 bytes, little-endian.
std::vector<uint8_t> seed_context(uint64_t seed);

}  // namespace kvf::perf
