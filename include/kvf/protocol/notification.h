// Hot-path notifications: small fixed-layout records sent behind the data (UCX active messages,
// or the local transport), e.g. "layer l of request r is complete in your buffers".
// 32 bytes, little-endian:
//   magic u32 "KVN1" | kind u16 | code u16 | session_id u64 | request_id u64 | layer u32 | reserved u32
// decode_notification rejects any other size, magic or kind. Plain values; no shared state.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

#include "kvf/protocol/status.h"

namespace kvf::protocol {

inline constexpr uint32_t kNotificationMagic = 0x314E564Bu;  // "KVN1"
inline constexpr size_t kNotificationBytes = 32;

enum class NotificationKind : uint16_t {
  kLayerReady = 1,    // every byte of (request, layer) is in place at the receiver
  kRequestAbort = 2,  // the sender gave up on the request (code says why)
  kPing = 3,          // latency probes
  kPong = 4,
};

struct Notification {
  NotificationKind kind = NotificationKind::kLayerReady;
  ErrorCode code = ErrorCode::kOk;
  uint64_t session_id = 0;
  uint64_t request_id = 0;
  uint32_t layer = 0;
  bool operator==(const Notification&) const = default;
};

std::array<uint8_t, kNotificationBytes> encode_notification(const Notification& n);
Result<Notification> decode_notification(std::span<const uint8_t> bytes);

}  // namespace kvf::protocol
