// StreamReceiver: the receiving end of KV layer streams and of kvfabric-perf runs. It listens on
// a control port; for each connecting sender it grants buffers (one region per layer, blocks
// placed in the order the RecvPlan names, optionally shuffled), tracks LayerReady notifications
// as layers land, verifies the bytes against the stream pattern when asked, and answers with a
// StreamResult. A sender that vanishes, aborts, or stalls past the stream timeout fails only its
// own streams; the receiver keeps serving others.
// Thread rules: create/destroy from one thread; callbacks run on its worker thread.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kvf/fabric/transport.h"
#include "kvf/gpudirect/memory_region.h"
#include "kvf/gpudirect/ucx_context.h"
#include "kvf/protocol/kv_layout.h"

namespace kvf::fabric {

struct StreamReport {
  std::string peer;  // the sender's name and address
  uint64_t request_id = 0;
  uint32_t layers = 0;
  uint64_t bytes = 0;  // expected bytes of the whole request
  Status status;       // ok only when every layer arrived (and verified, if asked)
  bool verified = false;
  uint64_t bytes_verified = 0;
  std::vector<uint64_t> layer_arrival_ns;  // since the offer was accepted
  // Engine pool mode: the pool blocks holding the request's blocks in order (on success they are
  // the engine's to use and free), and the offer's context.
  std::vector<uint32_t> blocks;
  std::vector<uint8_t> context;
};

// An engine's KV pool that streams land in, instead of buffers the receiver allocates (the decode
// side of PD: the prefill writes straight into the engine's paged cache). The pool's layers lie
// back to back in `region` (layer l at l * the layout's layer bytes), which peers can write.
struct EnginePool {
  const gpudirect::MemoryRegion* region = nullptr;  // must outlive the receiver
  protocol::KvLayoutDesc layout;                    // num_blocks: the pool's blocks
  // Blocks for a request of `n` blocks: distinct, in range (the engine's block manager). Empty:
  // no room, and the stream is refused. Runs on the receiver's worker thread.
  std::function<std::vector<uint32_t>(uint64_t request_id, uint32_t n)> allocate;
  // A failed stream's blocks, handed back once no late put of its sender can still land there
  // (after retire_grace). Runs on the transport's thread.
  std::function<void(uint64_t request_id, std::vector<uint32_t> blocks)> release;
};

// Where granted KV buffers live: host memory (UCX-allocated, shared with same-host peers), or
// one GPU's memory (exported with CUDA IPC for cuda_ipc peers, and registered with UCX where the
// UCX build handles CUDA memory).
struct BufferPlacement {
  bool gpu = false;
  int device = 0;
  std::string to_string() const { return gpu ? "cuda:" + std::to_string(device) : "host"; }
};

struct StreamReceiverOptions {
  std::string name = "kvfabric";
  BufferPlacement buffers;
  uint64_t max_request_bytes = 16ull << 30;  // larger offers are refused with a clear error
  std::chrono::milliseconds stream_timeout{120'000};
  // A granted region stays mapped this long after its stream ends (late puts of a dead or
  // misbehaving sender land there instead of in unmapped memory).
  std::chrono::milliseconds retire_grace{10'000};
  std::function<void(const StreamReport&)> on_stream_done;
  std::optional<EnginePool> pool;  // set: streams land in this engine pool
};

class StreamReceiver {
 public:
  // `transport` must outlive the receiver; the receiver installs its notification handler.
  static Result<std::unique_ptr<StreamReceiver>> start(std::shared_ptr<gpudirect::UcxContext> ucx,
                                                       Transport& transport, const std::string& host,
                                                       uint16_t port, StreamReceiverOptions options);
  ~StreamReceiver();
  uint16_t port() const;

  class Impl;

 private:
  explicit StreamReceiver(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvf::fabric
