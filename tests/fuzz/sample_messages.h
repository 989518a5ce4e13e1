// Valid control messages with pseudo-random contents, one builder per message type: the inputs of
// the round-trip tests, the fuzz replay test and the fuzz seed corpus. Deterministic for a seed.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kvf/protocol/messages.h"
#include "kvf/protocol/notification.h"

namespace kvf::protocol::testing {

class MessageFactory {
 public:
  explicit MessageFactory(uint64_t seed) : rng_(seed) {}

  // One message of `type` (1..11); vectors and strings are sometimes empty, sometimes long.
  Message make(MessageType type) {
    switch (type) {
      case MessageType::kHello:
        return Hello{u16(), u16(), str(), bytes(), bytes()};
      case MessageType::kHelloAck:
        return HelloAck{u16(), str(), bytes(), u64()};
      case MessageType::kRegionGrant: {
        RegionGrant m{u64(), layout(), {}};
        m.layer_regions.resize(below(6));
        for (auto& r : m.layer_regions) r = region();
        return m;
      }
      case MessageType::kStreamOffer:
        return StreamOffer{u64(), layout(), u32(), u64(), static_cast<uint32_t>(below(4)), bytes()};
      case MessageType::kRecvPlan: {
        RecvPlan m{u64(), u64(), {}};
        m.dst_blocks.resize(below(40));
        for (auto& b : m.dst_blocks) b = u32();
        return m;
      }
      case MessageType::kStreamResult: {
        StreamResult m{u64(), code(), str(), u64(), u64(), {}};
        m.layer_arrival_ns.resize(below(33));
        for (auto& t : m.layer_arrival_ns) t = u64();
        return m;
      }
      case MessageType::kAbort:
        return Abort{u64(), code(), str()};
      case MessageType::kRunRequest:
        return RunRequest{u64(), static_cast<RunMode>(below(2)), u64(), u32()};
      case MessageType::kRunResult:
        return RunResult{u64(), code(), str(), region()};
      case MessageType::kErrorReply:
        return ErrorReply{code(), str()};
      case MessageType::kBye:
        return Bye{str()};
    }
    return Bye{};
  }

  Notification notification() {
    return Notification{static_cast<NotificationKind>(1 + below(4)), code(), u64(), u64(), u32()};
  }

  uint64_t below(uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng_); }
  uint64_t u64() {
    // Mix small and full-range values: small ones exercise zero bytes, large ones the high bytes.
    return below(2) ? rng_() : below(300);
  }
  uint32_t u32() { return static_cast<uint32_t>(u64()); }
  uint16_t u16() { return static_cast<uint16_t>(u64()); }
  ErrorCode code() { return static_cast<ErrorCode>(below(13)); }
  std::string str() {
    std::string s(below(4) == 0 ? 0 : below(64), '\0');
    for (auto& c : s) c = static_cast<char>(below(256));
    return s;
  }
  std::vector<uint8_t> bytes() {
    std::vector<uint8_t> b(below(4) == 0 ? 0 : below(200));
    for (auto& c : b) c = static_cast<uint8_t>(below(256));
    return b;
  }
  KvLayoutDesc layout() {
    return KvLayoutDesc{static_cast<KvLayoutKind>(below(3)), u32(), u32(), u32(), u32(), u32(), u32()};
  }
  RegionDescriptor region() {
    return RegionDescriptor{u64(), u64(), u64(), static_cast<MemoryKind>(below(4)), bytes(), bytes()};
  }

  std::mt19937_64& rng() { return rng_; }

 private:
  std::mt19937_64 rng_;
};

inline constexpr uint16_t kFirstMessageType = 1;
inline constexpr uint16_t kLastMessageType = static_cast<uint16_t>(MessageType::kBye);

// Every message type, in order, built by a factory with `seed`.
inline std::vector<Message> sample_messages(uint64_t seed) {
  MessageFactory f(seed);
  std::vector<Message> out;
  for (uint16_t t = kFirstMessageType; t <= kLastMessageType; ++t)
    out.push_back(f.make(static_cast<MessageType>(t)));
  return out;
}

}  // namespace kvf::protocol::testing
