// Framing of the control messages: header (magic, version, type, length, checksum) around the
// payloads encoded by message_codec.cpp.
#include "kvf/protocol/messages.h"

#include <xxhash.h>

#include <algorithm>
#include <type_traits>

#include "message_codec.h"
#include "wire_codec.h"

namespace kvf::protocol {
namespace {

using wire::hex32;

bool known_type(uint16_t v) {
  return v >= 1 && v <= static_cast<uint16_t>(MessageType::kBye);
}

// message_type() maps the variant index to the type: alternative i is MessageType i + 1.
template <size_t I, typename T>
constexpr bool at = std::is_same_v<std::variant_alternative_t<I, Message>, T>;
static_assert(at<0, Hello> && at<1, HelloAck> && at<2, RegionGrant> && at<3, StreamOffer> &&
              at<4, RecvPlan> && at<5, StreamResult> && at<6, Abort> && at<7, RunRequest> &&
              at<8, RunResult> && at<9, ErrorReply> && at<10, Bye> && std::variant_size_v<Message> == 11);
static_assert(static_cast<uint16_t>(MessageType::kBye) == std::variant_size_v<Message>);

}  // namespace

MessageType message_type(const Message& message) {
  // The variant's alternatives are in MessageType order, starting at 1.
  return static_cast<MessageType>(message.index() + 1);
}

std::string_view message_type_name(MessageType type) {
  switch (type) {
    case MessageType::kHello:
      return "Hello";
    case MessageType::kHelloAck:
      return "HelloAck";
    case MessageType::kRegionGrant:
      return "RegionGrant";
    case MessageType::kStreamOffer:
      return "StreamOffer";
    case MessageType::kRecvPlan:
      return "RecvPlan";
    case MessageType::kStreamResult:
      return "StreamResult";
    case MessageType::kAbort:
      return "Abort";
    case MessageType::kRunRequest:
      return "RunRequest";
    case MessageType::kRunResult:
      return "RunResult";
    case MessageType::kErrorReply:
      return "ErrorReply";
    case MessageType::kBye:
      return "Bye";
  }
  return "unknown";
}

std::vector<uint8_t> encode_frame(const Message& message) {
  wire::Writer w;
  // Room for the header, patched in once the payload length and checksum are known.
  w.buffer().resize(kFrameHeaderBytes);
  encode_message_payload(message, w);
  std::vector<uint8_t> frame = w.take();
  const size_t payload_bytes = frame.size() - kFrameHeaderBytes;
  const uint32_t checksum =
      XXH32(frame.data() + kFrameHeaderBytes, payload_bytes, frame_checksum_seed(message_type(message)));
  wire::Writer h;
  h.u32(kFrameMagic);
  h.u16(kProtocolVersion);
  h.u16(static_cast<uint16_t>(message_type(message)));
  h.u32(static_cast<uint32_t>(payload_bytes));
  h.u32(checksum);
  std::copy(h.buffer().begin(), h.buffer().end(), frame.begin());
  return frame;
}

Result<FrameHeader> decode_frame_header(std::span<const uint8_t> bytes) {
  if (bytes.size() < kFrameHeaderBytes) {
    return Status(ErrorCode::kMalformed, "frame header: need " + std::to_string(kFrameHeaderBytes) +
                                             " bytes, have " + std::to_string(bytes.size()));
  }
  wire::Reader r(bytes.first(kFrameHeaderBytes), "frame header");
  FrameHeader h;
  uint16_t type = 0;
  r.u32("magic", h.magic);
  r.u16("version", h.version);
  r.u16("type", type);
  r.u32("payload_bytes", h.payload_bytes);
  r.u32("checksum", h.checksum);
  if (Status s = r.finish(); !s.ok()) return s;  // cannot happen: exactly 16 bytes were read

  if (h.magic != kFrameMagic) {
    return Status(ErrorCode::kMalformed,
                  "frame header: bad magic " + hex32(h.magic) + " (expected " + hex32(kFrameMagic) + ")");
  }
  if (h.version != kProtocolVersion) {
    return Status(ErrorCode::kUnsupportedVersion, "frame header: protocol version " +
                                                      std::to_string(h.version) +
                                                      " is not supported (this side speaks version " +
                                                      std::to_string(kProtocolVersion) + ")");
  }
  if (!known_type(type)) {
    return Status(ErrorCode::kMalformed, "frame header: unknown message type " + std::to_string(type));
  }
  h.type = static_cast<MessageType>(type);
  if (h.payload_bytes > kMaxFramePayload) {
    return Status(ErrorCode::kMalformed, "frame header: payload of " + std::to_string(h.payload_bytes) +
                                             " bytes exceeds the limit of " +
                                             std::to_string(kMaxFramePayload));
  }
  return h;
}

Result<Message> decode_payload(const FrameHeader& header, std::span<const uint8_t> payload) {
  const std::string_view name = message_type_name(header.type);
  if (payload.size() != header.payload_bytes) {
    return Status(ErrorCode::kMalformed, std::string(name) + ": header says " +
                                             std::to_string(header.payload_bytes) + " payload bytes, got " +
                                             std::to_string(payload.size()));
  }
  const uint32_t checksum = XXH32(payload.data(), payload.size(), frame_checksum_seed(header.type));
  if (checksum != header.checksum) {
    return Status(ErrorCode::kMalformed, std::string(name) + ": checksum mismatch (header " +
                                             hex32(header.checksum) + ", payload hashes to " +
                                             hex32(checksum) + ")");
  }
  return decode_message_payload(header.type, payload);
}

Result<Message> decode_frame(std::span<const uint8_t> bytes) {
  Result<FrameHeader> header = decode_frame_header(bytes);
  if (!header.ok()) return header.status();
  const size_t have = bytes.size() - kFrameHeaderBytes;
  if (have < header->payload_bytes) {
    return Status(ErrorCode::kMalformed,
                  std::string(message_type_name(header->type)) + ": truncated frame: header says " +
                      std::to_string(header->payload_bytes) + " payload bytes, have " + std::to_string(have));
  }
  if (have > header->payload_bytes) {
    return Status(ErrorCode::kMalformed, std::string(message_type_name(header->type)) + ": " +
                                             std::to_string(have - header->payload_bytes) +
                                             " trailing bytes after the frame");
  }
  return decode_payload(*header, bytes.subspan(kFrameHeaderBytes));
}

}  // namespace kvf::protocol
