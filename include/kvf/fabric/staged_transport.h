// StagedTransport ("ucx_staged"): the host-staged path. Every put is gathered into a slot of this
// side's host memory, crosses the link as one UCX put into a slot the receiver offered in its
// host memory, and the receiver scatters it to the destinations the put named:
//   KV (GPU or host) -> gather -> host slot -> UCX (tcp, shm, verbs) -> host slot -> scatter -> KV
// It connects wherever UCX does and needs nothing of UCX but host memory, so it carries GPU KV
// between hosts when UCX has no CUDA support and no better transport connects; on host memory it
// turns many small extents into few large transfers over a slow link.
//
// With `device` set, KV lives in that GPU's memory: gathers and scatters are one copy-kernel
// launch each through pinned slots. Otherwise KV is host memory and the CPU copies, on `workers`
// threads of the transport's own so that the progress thread keeps UCX busy meanwhile.
//
// Compressed slots (host memory only): with `codec` int8 or fp8 every put is split into runs of
// whole rows of `row_bytes` (a KV block part is block_tokens rows of channels bf16 values, so
// row_bytes = channels x 2), the gather encodes each run into the slot (per row a float32 scale
// and one byte a value: gpudirect::encode_rows, the bytes the tile codec writes for those rows),
// and the receiver decodes while scattering. Only the encoded bytes cross the link (int8/fp8:
// (4 + channels) / (2 x channels) of raw, 0.502x for 1024 channels). The values that land are
// the codec's decode of the source, not the source: lossy by design. Both sides must be created
// with the same codec (and, where the receiver sets one, row size); a receiver refuses a sender
// of another codec when it asks for slots, and that refusal fails the sender's puts with both
// named. A put whose lengths are not whole rows fails with kInvalidArgument. The receiver
// checks every Scatter against the sender's codec, row size and slot before it writes a byte.
// The receiver
// places bytes only in memory it could have been written by a put anyway (UCX-registered host
// memory, or cudaMalloc'd memory of its GPU), outside its slots, and answers each slot; a put
// completes when every byte of it is placed, so a flush after it means "arrived".
// Messages: the cuda_ipc transport's staging messages (request/offer/scatter/scattered/closed)
// over the inner UCX connection and a connection back to the sender.
//
// Threads: as Transport; one progress thread (the inner UcxTransport's). Connections back to
// senders and slot imports, which block, run on helper threads joined at destruction.
#pragma once

#include <chrono>
#include <memory>

#include "kvf/fabric/transport.h"
#include "kvf/fabric/ucx_transport.h"
#include "kvf/gpudirect/ucx_context.h"
#include "kvf/protocol/kv_codec.h"

namespace kvf::fabric {

struct StagedTransportOptions {
  int device = -1;                                  // where KV lives: -1 host memory, N GPU N
  uint64_t slot_bytes = 8ull << 20;                 // one gather / one UCX put / one scatter
  uint32_t slots = 4;                               // slots per sender on each side (bytes in flight)
  uint64_t receive_limit = 1ull << 30;              // slots this receiver gives all senders together
  std::chrono::milliseconds offer_timeout{10'000};  // a receiver that never offers fails the puts
  // Host memory: identity (raw), int8 or fp8 (per-token scaled, protocol/kv_codec.h); what this
  // side's puts are encoded with, and the only codec it takes from senders.
  protocol::KvCodec codec = protocol::KvCodec::kIdentity;
  // With a codec: bytes of one token row (channels x 2, even); puts are whole rows. On a
  // receiver, 0 takes any row size, else senders must use this one.
  uint32_t row_bytes = 0;
  // Host memory: threads that copy, encode and decode slots (0: the progress thread does).
  uint32_t workers = 1;
  UcxTransportOptions ucx;
};

class StagedTransport final : public Transport {
 public:
  // kUnavailable when `device` is set and this build or machine has no such GPU.
  static Result<std::unique_ptr<StagedTransport>> create(std::shared_ptr<gpudirect::UcxContext> context,
                                                         StagedTransportOptions options = {});
  ~StagedTransport() override;

  std::string_view name() const override { return "ucx_staged"; }
  std::vector<uint8_t> address() const override;
  Result<PeerId> connect(std::span<const uint8_t> address, const ConnectOptions& options = {}) override;
  // Remembers where the region lies in the peer's memory: the receiver places bytes there itself.
  Result<RemoteRegionId> import_region(PeerId peer, const protocol::RegionDescriptor& region) override;
  void disconnect(PeerId peer) override;
  void put(PeerId peer, std::vector<PutOp> ops, Completion done) override;
  void flush(PeerId peer, Completion done) override;
  void notify(PeerId peer, std::span<const uint8_t> bytes, Completion done) override;
  void set_notification_handler(NotificationHandler handler) override;
  void set_peer_failure_handler(PeerFailureHandler handler) override;
  void post(std::function<void()> fn) override;
  void post_after(std::chrono::nanoseconds delay, std::function<void()> fn) override;

  class Impl;

 private:
  explicit StagedTransport(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// True when `address` was written by a StagedTransport.
bool is_staged_transport_address(std::span<const uint8_t> address);

}  // namespace kvf::fabric
