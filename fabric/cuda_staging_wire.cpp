#include "cuda_staging_wire.h"

#include <limits>
#include <type_traits>

namespace kvf::fabric::staging {
namespace {

enum class Type : uint16_t { kRequest = 1, kOffer = 2, kScatter = 3, kScattered = 4 };

constexpr size_t kMaxString = 4096;
constexpr size_t kMaxBlob = 4096;
constexpr size_t kMaxEventHandle = 256;

class Writer {
 public:
  explicit Writer(Type type) {
    u32(kMagic);
    u16(kVersion);
    u16(static_cast<uint16_t>(type));
  }
  void u16(uint16_t v) { put(v, 2); }
  void u32(uint32_t v) { put(v, 4); }
  void u64(uint64_t v) { put(v, 8); }
  void bytes(std::span<const uint8_t> b) {
    u32(static_cast<uint32_t>(b.size()));
    out_.insert(out_.end(), b.begin(), b.end());
  }
  void text(const std::string& s) {
    bytes({reinterpret_cast<const uint8_t*>(s.data()), std::min(s.size(), kMaxString)});
  }
  std::vector<uint8_t> take() { return std::move(out_); }

 private:
  void put(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out_.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
  std::vector<uint8_t> out_;
};

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> in) : in_(in) {}
  bool u16(uint16_t& v) { return get(v, 2); }
  bool u32(uint32_t& v) { return get(v, 4); }
  bool u64(uint64_t& v) { return get(v, 8); }
  bool bytes(std::vector<uint8_t>& v, size_t limit) {
    uint32_t n = 0;
    if (!u32(n) || n > limit || n > left()) return false;
    v.assign(in_.begin() + static_cast<long>(at_), in_.begin() + static_cast<long>(at_ + n));
    at_ += n;
    return true;
  }
  bool text(std::string& s) {
    std::vector<uint8_t> b;
    if (!bytes(b, kMaxString)) return false;
    s.assign(b.begin(), b.end());
    return true;
  }
  size_t left() const { return in_.size() - at_; }

 private:
  template <typename T>
  bool get(T& v, int n) {
    if (left() < static_cast<size_t>(n)) return false;
    uint64_t x = 0;
    for (int i = 0; i < n; ++i) x |= static_cast<uint64_t>(in_[at_ + i]) << (8 * i);
    at_ += static_cast<size_t>(n);
    v = static_cast<T>(x);
    return true;
  }
  std::span<const uint8_t> in_;
  size_t at_ = 0;
};

Status malformed(const std::string& what) {
  return Status(ErrorCode::kMalformed, "cuda_ipc staging message: " + what);
}

bool known_error(uint32_t code) {
  return code <= static_cast<uint32_t>(ErrorCode::kUnavailable);
}

}  // namespace

bool is_staging_message(std::span<const uint8_t> bytes) {
  return bytes.size() >= 4 &&
         (bytes[0] | bytes[1] << 8 | bytes[2] << 16 | static_cast<uint32_t>(bytes[3]) << 24) == kMagic;
}

std::vector<uint8_t> encode(const Message& message) {
  return std::visit(
      [](const auto& m) {
        using T = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<T, StagingRequest>) {
          Writer w(Type::kRequest);
          w.u64(m.sender);
          w.u32(m.slots);
          w.u64(m.slot_bytes);
          w.bytes(m.reply_address);
          w.u32(static_cast<uint32_t>(m.slot_events.size()));
          for (const auto& e : m.slot_events) w.bytes(e);
          w.bytes(m.nccl_id);
          return w.take();
        } else if constexpr (std::is_same_v<T, StagingOffer>) {
          Writer w(Type::kOffer);
          w.u64(m.sender);
          w.u32(m.slots);
          w.u64(m.slot_bytes);
          w.bytes(m.cuda_ipc);
          w.u32(m.error);
          w.text(m.message);
          return w.take();
        } else if constexpr (std::is_same_v<T, Scatter>) {
          Writer w(Type::kScatter);
          w.u64(m.sender);
          w.u64(m.batch);
          w.u32(m.slot);
          w.u32(static_cast<uint32_t>(m.pieces.size()));
          for (const ScatterPiece& p : m.pieces) {
            w.u64(p.destination);
            w.u64(p.bytes);
          }
          return w.take();
        } else {
          Writer w(Type::kScattered);
          w.u64(m.sender);
          w.u64(m.batch);
          w.u32(m.slot);
          w.u32(m.error);
          w.text(m.message);
          return w.take();
        }
      },
      message);
}

Result<Message> decode(std::span<const uint8_t> bytes) {
  Reader r(bytes);
  uint32_t magic = 0;
  uint16_t version = 0, type = 0;
  if (!r.u32(magic) || magic != kMagic) return malformed("no staging magic");
  if (!r.u16(version) || !r.u16(type)) return malformed("truncated header");
  if (version != kVersion) {
    return Status(ErrorCode::kUnsupportedVersion, "cuda_ipc staging message version " +
                                                      std::to_string(version) + ", this build speaks " +
                                                      std::to_string(kVersion));
  }
  Message out;
  switch (static_cast<Type>(type)) {
    case Type::kRequest: {
      StagingRequest m;
      if (!r.u64(m.sender) || !r.u32(m.slots) || !r.u64(m.slot_bytes) || !r.bytes(m.reply_address, kMaxBlob))
        return malformed("truncated staging request");
      if (m.slots == 0 || m.slots > kMaxSlots || m.slot_bytes == 0 || m.slot_bytes > kMaxSlotBytes)
        return malformed("staging request for " + std::to_string(m.slots) + " slots of " +
                         std::to_string(m.slot_bytes) + " bytes");
      if (m.reply_address.empty()) return malformed("staging request without a reply address");
      uint32_t events = 0;
      if (!r.u32(events) || (events != m.slots && events != 0))
        return malformed("staging request without one event per slot");
      m.slot_events.resize(events);
      for (auto& e : m.slot_events) {
        if (!r.bytes(e, kMaxEventHandle) || e.empty()) return malformed("truncated slot event");
      }
      if (!r.bytes(m.nccl_id, kMaxEventHandle)) return malformed("truncated NCCL id");
      if (m.nccl_id.empty() == m.slot_events.empty())
        return malformed("a staging request names either slot events or an NCCL communicator");
      out = std::move(m);
      break;
    }
    case Type::kOffer: {
      StagingOffer m;
      if (!r.u64(m.sender) || !r.u32(m.slots) || !r.u64(m.slot_bytes) || !r.bytes(m.cuda_ipc, kMaxBlob) ||
          !r.u32(m.error) || !r.text(m.message))
        return malformed("truncated staging offer");
      if (!known_error(m.error)) return malformed("unknown error code " + std::to_string(m.error));
      if (m.error == 0 && (m.cuda_ipc.empty() || m.slots == 0 || m.slots > kMaxSlots || m.slot_bytes == 0 ||
                           m.slot_bytes > kMaxSlotBytes))
        return malformed("staging offer without usable slots");
      out = std::move(m);
      break;
    }
    case Type::kScatter: {
      Scatter m;
      uint32_t count = 0;
      if (!r.u64(m.sender) || !r.u64(m.batch) || !r.u32(m.slot) || !r.u32(count))
        return malformed("truncated scatter");
      if (count == 0 || count > kMaxPieces || r.left() != uint64_t{count} * 16)
        return malformed("scatter of " + std::to_string(count) + " pieces in " + std::to_string(r.left()) +
                         " bytes");
      m.pieces.resize(count);
      uint64_t total = 0;
      for (ScatterPiece& p : m.pieces) {
        r.u64(p.destination);
        r.u64(p.bytes);
        if (p.bytes == 0 || p.bytes > kMaxSlotBytes || p.destination == 0 ||
            p.destination > std::numeric_limits<uint64_t>::max() - p.bytes)
          return malformed("scatter piece of " + std::to_string(p.bytes) + " bytes");
        total += p.bytes;
      }
      if (total > kMaxSlotBytes) return malformed("scatter larger than any slot");
      out = std::move(m);
      break;
    }
    case Type::kScattered: {
      Scattered m;
      if (!r.u64(m.sender) || !r.u64(m.batch) || !r.u32(m.slot) || !r.u32(m.error) || !r.text(m.message))
        return malformed("truncated scattered");
      if (!known_error(m.error)) return malformed("unknown error code " + std::to_string(m.error));
      out = std::move(m);
      break;
    }
    default:
      return malformed("unknown type " + std::to_string(type));
  }
  if (r.left() != 0) return malformed(std::to_string(r.left()) + " trailing bytes");
  return out;
}

}  // namespace kvf::fabric::staging
