// The frame decoder fuzz entry, shared by the libFuzzer target (clang builds) and the
// test_fuzz_replay unit test (every build). It feeds one input to every decoder in three ways:
//   1. as a whole frame (decode_frame, and decode_frame_header + decode_payload),
//   2. as "type byte | payload" under a header with the right checksum, so that mutations reach
//      the payload decoders (a fuzzer cannot guess XXH32 checksums),
//   3. as a notification record;
// and checks that whatever decodes re-encodes to the same bytes and decodes to an equal value.
// A broken invariant aborts, which both libFuzzer and ctest report.
#pragma once

#include <xxhash.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>

#include "kvf/protocol/messages.h"
#include "kvf/protocol/notification.h"

namespace kvf::protocol::testing {

inline void fuzz_require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "frame decoder fuzz invariant broken: %s\n", what);
    std::abort();
  }
}

inline bool same_bytes(std::span<const uint8_t> a, std::span<const uint8_t> b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end());
}

// Encodes a decoded message again and checks it is the input frame, and decodes to itself.
inline void fuzz_check_reencode(const Message& m, std::span<const uint8_t> frame) {
  const std::vector<uint8_t> again = encode_frame(m);
  fuzz_require(same_bytes(again, frame), "encode(decode(frame)) != frame");
  Result<Message> back = decode_frame(again);
  fuzz_require(back.ok() && *back == m, "decode(encode(m)) != m");
}

inline void fuzz_one_frame(std::span<const uint8_t> in) {
  Result<Message> whole = decode_frame(in);
  Result<FrameHeader> header = decode_frame_header(in);
  if (!header.ok()) {
    fuzz_require(!whole.ok() && whole.status().code() == header.status().code(),
                 "decode_frame accepted what decode_frame_header rejected");
    fuzz_require(!header.status().message().empty(), "error without a message");
    return;
  }
  std::span<const uint8_t> rest = in.subspan(kFrameHeaderBytes);
  Result<Message> piecewise =
      decode_payload(*header, rest.first(std::min<size_t>(rest.size(), header->payload_bytes)));
  if (whole.ok()) {
    fuzz_require(rest.size() == header->payload_bytes, "decode_frame accepted a frame of the wrong size");
    fuzz_require(piecewise.ok() && *piecewise == *whole, "decode_frame and decode_payload disagree");
    fuzz_require(message_type(*whole) == header->type, "decoded message of another type than the header's");
    fuzz_check_reencode(*whole, in);
  } else {
    fuzz_require(!whole.status().message().empty(), "error without a message");
    fuzz_require(!piecewise.ok() || rest.size() != header->payload_bytes,
                 "decode_payload accepted what decode_frame rejected");
  }
}

inline void fuzz_one_payload(std::span<const uint8_t> in) {
  if (in.empty()) return;
  FrameHeader h;
  // 12 values: the 11 types and one unknown (0), which a caller could also pass.
  h.type = static_cast<MessageType>(in[0] % 12);
  std::span<const uint8_t> payload = in.subspan(1);
  h.payload_bytes = static_cast<uint32_t>(payload.size());
  h.checksum = XXH32(payload.data(), payload.size(), frame_checksum_seed(h.type));
  Result<Message> m = decode_payload(h, payload);
  if (!m.ok()) {
    fuzz_require(!m.status().message().empty(), "error without a message");
    return;
  }
  fuzz_require(message_type(*m) == h.type, "decoded message of another type than the header's");
  const std::vector<uint8_t> frame = encode_frame(*m);
  fuzz_require(same_bytes(std::span<const uint8_t>(frame).subspan(kFrameHeaderBytes), payload),
               "encode(decode(payload)) != payload");
  fuzz_check_reencode(*m, frame);
}

inline void fuzz_one_notification(std::span<const uint8_t> in) {
  Result<Notification> n = decode_notification(in);
  if (!n.ok()) {
    fuzz_require(!n.status().message().empty(), "error without a message");
    return;
  }
  const auto again = encode_notification(*n);
  Result<Notification> back = decode_notification(again);
  fuzz_require(back.ok() && *back == *n, "decode(encode(notification)) != notification");
  // Bytes 28..31 are reserved and ignored by the decoder; everything before them must round-trip.
  fuzz_require(same_bytes(std::span<const uint8_t>(again).first(28), in.first(28)),
               "encode(decode(notification)) differs outside the reserved word");
}

// The entry: never crashes, never reads out of range, for any input.
inline int fuzz_frame_decoder(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> in(data, size);
  fuzz_one_frame(in);
  fuzz_one_payload(in);
  fuzz_one_notification(in);
  if (size > kNotificationBytes) fuzz_one_notification(in.first(kNotificationBytes));
  return 0;
}

}  // namespace kvf::protocol::testing
