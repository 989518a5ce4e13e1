// Private: the payloads of the control messages, without header or checksum (messages.cpp
// frames them). Decoding is exact: every count is checked before allocating, every enum value
// is checked, and bytes left over after the last field are an error.
#pragma once

#include <cstdint>
#include <span>

#include "kvf/protocol/messages.h"
#include "wire_codec.h"

namespace kvf::protocol {

void encode_message_payload(const Message& message, wire::Writer& out);
// kMalformed, naming the field, for anything but exactly one valid payload of `type`.
Result<Message> decode_message_payload(MessageType type, std::span<const uint8_t> payload);

}  // namespace kvf::protocol
