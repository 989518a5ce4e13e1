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
#include <string>
#include <vector>

#include "kvf/fabric/transport.h"
#include "kvf/gpudirect/ucx_context.h"

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
