#include "kvf/protocol/notification.h"

#include <cstdio>
#include <string>

namespace kvf::protocol {
namespace {

uint64_t get_le(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= uint64_t{p[i]} << (8 * i);
  return v;
}

void put_le(uint8_t* p, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

Status malformed(const std::string& what) {
  return Status(ErrorCode::kMalformed, "notification: " + what);
}

}  // namespace

std::array<uint8_t, kNotificationBytes> encode_notification(const Notification& n) {
  std::array<uint8_t, kNotificationBytes> b{};  // reserved (bytes 28..31) stays zero
  put_le(&b[0], kNotificationMagic, 4);
  put_le(&b[4], static_cast<uint16_t>(n.kind), 2);
  put_le(&b[6], static_cast<uint16_t>(n.code), 2);
  put_le(&b[8], n.session_id, 8);
  put_le(&b[16], n.request_id, 8);
  put_le(&b[24], n.layer, 4);
  return b;
}

Result<Notification> decode_notification(std::span<const uint8_t> bytes) {
  if (bytes.size() != kNotificationBytes) {
    return malformed("expected " + std::to_string(kNotificationBytes) + " bytes, got " +
                     std::to_string(bytes.size()));
  }
  const uint8_t* p = bytes.data();
  const auto magic = static_cast<uint32_t>(get_le(p, 4));
  if (magic != kNotificationMagic) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "bad magic 0x%08x (expected 0x%08x)", magic, kNotificationMagic);
    return malformed(buf);
  }
  const auto kind = static_cast<uint16_t>(get_le(p + 4, 2));
  if (kind < static_cast<uint16_t>(NotificationKind::kLayerReady) ||
      kind > static_cast<uint16_t>(NotificationKind::kPong)) {
    return malformed("unknown kind " + std::to_string(kind));
  }
  const auto code = static_cast<uint16_t>(get_le(p + 6, 2));
  // error_code_name names every enumerator, so this follows the enum without a second list.
  if (error_code_name(static_cast<ErrorCode>(code)) == "unknown")
    return malformed("unknown error code " + std::to_string(code));
  // The reserved word is ignored rather than required to be zero, so that a later version can use it
  // without breaking receivers of this one.
  Notification n;
  n.kind = static_cast<NotificationKind>(kind);
  n.code = static_cast<ErrorCode>(code);
  n.session_id = get_le(p + 8, 8);
  n.request_id = get_le(p + 16, 8);
  n.layer = static_cast<uint32_t>(get_le(p + 24, 4));
  return n;
}

}  // namespace kvf::protocol
