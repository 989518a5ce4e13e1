// TransferScheduler: runs layer transfer plans on a Transport. Layers go out in the order they
// are submitted (a request's layers in layer order), at most max_inflight_bytes at a time (by
// default as many as the transport asks for, see TransferSchedulerOptions); each
// layer is put, flushed (remotely complete), and only then announced to the receiver with a
// LayerReady notification, so the receiver never sees a layer as complete before its bytes are.
// A failed or timed-out layer fails the rest of its request (kRequestAbort is sent to the
// receiver); other requests go on.
// Thread rules: submit/abort from any thread; completions run on the transport's progress thread.
// Destroy the scheduler before its transport.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>

#include "kvf/fabric/transfer_plan.h"
#include "kvf/fabric/transport.h"

namespace kvf::fabric {

struct LayerSend {
  TransferPlan plan;  // request_id and layer come from here
  PeerId peer = 0;
  uint64_t session_id = 0;            // the receiver's id for this connection
  const uint8_t* src_base = nullptr;  // the sender's buffer of this layer
  const gpudirect::MemoryRegion* src_region = nullptr;
  RemoteRegionId dst_region = 0;  // the receiver's buffer of this layer
  // GPU layers: the cudaEvent_t the engine recorded after computing this layer. The transfer
  // starts after it (the transport's stream waits on the GPU; nobody blocks), so save_layer can
  // be called right after the compute was enqueued. Must stay valid until the layer is done.
  void* ready_event = nullptr;
};

using LayerDone = std::function<void(uint64_t request_id, uint32_t layer, const Status& status)>;

struct TransferSchedulerOptions {
  // Bytes of layers put but not yet remotely complete, at most (a layer larger than this still
  // goes, alone). 0: automatic, kDefaultInflightBytes or the transport's
  // suggested_inflight_bytes(), whichever is larger.
  static constexpr uint64_t kDefaultInflightBytes = 128ull << 20;
  uint64_t max_inflight_bytes = 0;
  std::chrono::milliseconds layer_timeout{30000};
};

struct TransferSchedulerStats {
  uint64_t layers_done = 0;
  uint64_t layers_failed = 0;
  uint64_t bytes_done = 0;
};

class TransferScheduler {
 public:
  TransferScheduler(Transport& transport, TransferSchedulerOptions options = {});
  ~TransferScheduler();
  TransferScheduler(const TransferScheduler&) = delete;
  TransferScheduler& operator=(const TransferScheduler&) = delete;

  void submit(LayerSend layer, LayerDone done);
  // Fails the request's queued and in-flight layers with `reason` and tells the receiver.
  void abort_request(PeerId peer, uint64_t session_id, uint64_t request_id, Status reason);
  TransferSchedulerStats stats() const;
  // The window in force: max_inflight_bytes, or the automatic one it was resolved to.
  uint64_t max_inflight_bytes() const;

  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace kvf::fabric
