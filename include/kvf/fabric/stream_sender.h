// The sending end of KV layer streams: PeerLink is one sender's connection to a receiver (the
// control channel plus a transport connection, after the Hello/HelloAck handshake), and
// send_pattern_stream streams a request of pattern data layer by layer through a
// TransferScheduler, for kvfabric-perf and the PD demo.
// Thread rules: a PeerLink is used by one thread at a time.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvf/fabric/control_channel.h"
#include "kvf/fabric/transfer_scheduler.h"
#include "kvf/fabric/transport.h"
#include "kvf/protocol/kv_layout.h"

namespace kvf::fabric {

class PeerLink {
 public:
  static Result<std::unique_ptr<PeerLink>> connect(Transport& transport, const std::string& host,
                                                   uint16_t port, const std::string& my_name,
                                                   std::chrono::milliseconds timeout);
  ~PeerLink();

  BlockingControlClient& control() { return control_; }
  PeerId peer() const { return peer_; }
  uint64_t session_id() const { return session_id_; }
  const std::string& remote_name() const { return remote_name_; }
  // Waits for the next message, skipping none; ErrorReply/Abort become errors naming the peer.
  Result<protocol::Message> expect(std::chrono::milliseconds timeout);

 private:
  PeerLink(Transport& transport, BlockingControlClient control, PeerId peer, uint64_t session,
           std::string name)
      : transport_(transport),
        control_(std::move(control)),
        peer_(peer),
        session_id_(session),
        remote_name_(std::move(name)) {}
  Transport& transport_;
  BlockingControlClient control_;
  PeerId peer_;
  uint64_t session_id_;
  std::string remote_name_;
};

struct PatternStreamOptions {
  uint64_t request_id = 1;
  uint64_t seed = 1;
  bool verify = true;
  bool shuffle = true;
  // Runs on the caller's thread before layer l is handed to the scheduler (the "compute" of the
  // layer: the demo fills the layer's pattern here, so streaming overlaps it). A GPU engine
  // enqueues the layer's compute and returns the cudaEvent_t recorded after it: the transfer then
  // waits for that event on the GPU (nullptr: the layer is ready now).
  std::function<void*(uint32_t layer)> before_layer;
  // Asked after each before_layer: not Ok ends the stream there (the receiver is told with an
  // Abort, so it never takes the request as complete) and the call returns that status.
  std::function<Status()> cancelled;
  std::chrono::milliseconds timeout{120'000};
  // Engine streams: the request's blocks in the source pool, in order (empty: blocks 0..n-1 of
  // `layout`, the whole source), and what the receiving engine needs to continue the request.
  std::vector<uint32_t> source_blocks;
  std::vector<uint8_t> context;
};

// All times are in seconds since just before before_layer(0).
struct PatternStreamOutcome {
  std::chrono::steady_clock::time_point start;  // what the times below count from
  double seconds = 0;                           // -> the last layer remotely complete
  std::vector<double> layer_ready_s;            // per layer: before_layer returned (the layer was "computed",
                                                // or for GPU compute: enqueued)
  std::vector<double> layer_done_s;             // per layer: remotely complete and announced
  protocol::StreamResult result;                // the receiver's verdict
};

// Streams `layout.num_layers` layers from `source` (layers back to back, layer l at l * layer_bytes;
// `layout.num_blocks` blocks each) to the receiver behind `link`: the request's blocks are
// options.source_blocks, or all of them. An engine streams its real KV with it (before_layer waits
// for the layer's compute, verify off); kvfabric-perf streams pattern data.
Result<PatternStreamOutcome> send_pattern_stream(PeerLink& link, Transport& transport,
                                                 TransferScheduler& scheduler,
                                                 const gpudirect::MemoryRegion& source,
                                                 const protocol::KvLayout& layout,
                                                 const PatternStreamOptions& options);

// Fills layer `layer` of `source` (host or GPU memory) with the pattern the receiver will check:
// the request's i-th block's pattern goes into pool block source_blocks[i] (empty: block i), as
// send_pattern_stream with the same options.source_blocks sends it. What blocks outside the
// request hold afterwards is unspecified.
Status fill_layer_pattern(const gpudirect::MemoryRegion& source, const protocol::KvLayout& layout,
                          uint32_t layer, uint64_t seed, std::span<const uint32_t> source_blocks = {});

}  // namespace kvf::fabric
