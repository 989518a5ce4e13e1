// The messages of the cuda_ipc transport's receiver-side staging (CudaCopyMethod::kStaged), sent
// as notifications on the transport's inner UCX connection, both ways:
//   sender -> receiver  StagingRequest: "stage my puts through slots on your GPU; reach me here"
//   receiver -> sender  StagingOffer:   the slots' CUDA IPC blob (or why there are none)
//   sender -> receiver  Scatter:        slot S is being filled (its event fires when it is full);
//                                       place its bytes at these addresses
//   receiver -> sender  Scattered:      slot S is placed (and free again), or why not
//   sender -> receiver  StagingClosed:  the sender is done: free its slots (and, for nccl, close
//                                       the communicator now, as the sender does the same)
// Every message starts with a magic that no stream frame ("KVF1") has, so the transport can take
// its own messages out of the notification stream. Decoding checks every count against the bytes
// present before allocating, and refuses unknown types, versions and trailing bytes.
// Versions: v1 as above; v2 adds a KV codec and a row size to StagingRequest and Scatter (the
// ucx_staged transport's compressed slots). A message whose codec is identity with no row size is
// written as v1, byte for byte what v1 wrote, so raw staging still meets v1 peers; decode takes
// both (v1: identity).
// v3 adds the GPU hand-over of the cuda_ipc transport's staged puts: per receiver slot two uint32
// use counters, "ready" in the receiver's slot buffer (bumped by the sender's stream after its copy
// into the slot) and "freed" in the sender's GPU memory (bumped by the receiver's stream after it
// scattered the slot); each side's stream waits on the counter in its own memory, so the sender
// enqueues chunks ahead of the receiver host's answers. StagingRequest::handover,
// StagingOffer::ready_offset and Scatter::use carry them. A message is written as v3 only when one
// of those is set, else byte for byte as v1/v2 wrote it; v3 is the older version's layout with the
// v3 field appended (a v3 StagingRequest or Scatter also carries v2's codec fields, zero or not),
// and a v3 message whose v3 field is unset is refused, so every message has one encoding. Decode
// takes v1 to v4 (older: no hand-over). Scattered and StagingClosed are v1 in every version.
// v4 adds Scatter::sends (the nccl transport sends a slot straight from the engine's blocks as
// several sends, which the receiver must match with receives of the same sizes): written only when
// it has two or more entries, after v3's fields (whose `use` may then be 0); a v4 scatter without
// it is refused.
// Every version starts a Scatter with sender, batch and slot, so a receiver that cannot decode
// one (a newer version, damaged pieces) can still answer it with an error (scatter_ids), and the
// sender's put fails at once with the reason instead of by its timeout. Later versions must keep
// those three fields first.
// Value types, no threads.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "kvf/protocol/status.h"

namespace kvf::protocol::staging {

inline constexpr uint32_t kMagic = 0x5343564b;  // "KVCS" little-endian
inline constexpr uint16_t kVersion = 4;         // the newest this build writes
inline constexpr uint16_t kMinVersion = 1;      // the oldest it reads
inline constexpr uint32_t kMaxRowBytes = 1u << 20;
inline constexpr uint32_t kMaxSlots = 64;
inline constexpr uint64_t kMaxSlotBytes = 1ull << 30;
inline constexpr uint32_t kMaxPieces = 1u << 20;
inline constexpr uint32_t kMaxSends = 64;

struct StagingRequest {
  uint64_t sender = 0;  // the sending transport's token: names the sender in every later message
  uint32_t slots = 0;
  uint64_t slot_bytes = 0;
  std::vector<uint8_t> reply_address;  // the sender's transport address (CudaIpcTransport::address())
  // Per slot, a CUDA IPC event the sender records once its copy into that slot is enqueued; the
  // receiver's scatter waits for it on the GPU, so a Scatter can be sent before the copy ends.
  std::vector<std::vector<uint8_t>> slot_events;
  // The nccl transport instead: the id of a two-rank NCCL communicator (the sender is rank 0) that
  // carries the slots with send/recv; then slot_events is empty. At most one of the two is given;
  // neither: host staging (the ucx_staged transport), whose slots the sender fills by UCX puts.
  std::vector<uint8_t> nccl_id;
  // v2, host staging: every slot of this sender is encoded with `codec` (protocol/kv_codec.h;
  // identity, int8 or fp8) in runs of whole rows of `row_bytes` (channels x 2) bytes.
  uint8_t codec = 0;
  uint32_t row_bytes = 0;
  // v3, GPU staging (slot events or NCCL): the CUDA IPC blob of the sender's "freed" counters, one
  // uint32 per slot in the sender's GPU memory, which the receiver's stream sets to a Scatter's
  // `use` once it has scattered that slot. Opaque bytes here, at most 4096. Empty: no hand-over
  // (the sender reuses a slot only once its Scattered answer came). Not with host staging.
  std::vector<uint8_t> handover = {};
};

struct StagingOffer {
  uint64_t sender = 0;
  uint32_t slots = 0;
  uint64_t slot_bytes = 0;
  // The slots' CUDA IPC blob; for host staging their address (u64) and packed UCX rkey. Empty
  // when refused.
  std::vector<uint8_t> cuda_ipc;
  uint32_t error = 0;  // an ErrorCode; 0: offered
  std::string message;
  // v3: where, in bytes from the start of the exported slot buffer (`cuda_ipc`), the receiver's
  // "ready" counters are, one uint32 per slot, which the sender's stream sets to a Scatter's `use`
  // after its copy into that slot. 4-byte aligned and past the slots (>= slots x slot_bytes); the
  // sender checks it against the buffer it maps. 0: the receiver does no hand-over (an older
  // receiver, no handover in the request, or it refused), so the sender waits for Scattered answers.
  uint64_t ready_offset = 0;
};

// One contiguous run of the slot (pieces follow each other from the slot's start) and where the
// receiver places it: an address in the receiver's own address space.
struct ScatterPiece {
  uint64_t destination = 0;
  uint64_t bytes = 0;
};

// With a codec (v2), piece i's `bytes` are raw bytes (whole rows of row_bytes) and the slot holds
// each piece encoded in turn: its rows' float32 scales, then their codes (gpudirect/kv_codec.h's
// encode_rows), rows x (4 + row_bytes / 2) bytes a piece.
struct Scatter {
  uint64_t sender = 0;
  uint64_t batch = 0;  // the sender's sequence number, echoed back
  uint32_t slot = 0;
  std::vector<ScatterPiece> pieces;
  uint8_t codec = 0;  // v2: as the StagingRequest's
  uint32_t row_bytes = 0;
  // v3, with hand-over: which use of the slot this is (1, 2, 3, ... per slot). The receiver's stream
  // waits for ready[slot] >= use, scatters, then sets freed[slot] = use. 0: no hand-over.
  uint32_t use = 0;
  // v4, nccl: the slot arrives as sends of these sizes, in order (their sum: the pieces' bytes);
  // the receiver posts one receive per entry, back to back from the slot's start. Empty: one send
  // of all the pieces' bytes. Never one entry, at most kMaxSends, no codec.
  std::vector<uint64_t> sends = {};
};

struct Scattered {
  uint64_t sender = 0;
  uint64_t batch = 0;
  uint32_t slot = 0;
  uint32_t error = 0;  // an ErrorCode; 0: placed
  std::string message;
};

struct StagingClosed {
  uint64_t sender = 0;
};

using Message = std::variant<StagingRequest, StagingOffer, Scatter, Scattered, StagingClosed>;

// True when `bytes` starts with kMagic (a staging message, well-formed or not).
bool is_staging_message(std::span<const uint8_t> bytes);

std::vector<uint8_t> encode(const Message& message);
Result<Message> decode(std::span<const uint8_t> bytes);

// What a receiver needs to refuse a Scatter it cannot decode: the ids every version starts it
// with, and the version it claims. Empty when `bytes` is not a staging Scatter or is too short
// to hold them.
struct ScatterIds {
  uint64_t sender = 0;
  uint64_t batch = 0;
  uint32_t slot = 0;
  uint16_t version = 0;
};
std::optional<ScatterIds> scatter_ids(std::span<const uint8_t> bytes);
// The answer to a Scatter that `decode` refused with `why` (its code and message, which names
// the version or the damaged field).
Scattered refusal(const ScatterIds& ids, const Status& why);

}  // namespace kvf::protocol::staging
