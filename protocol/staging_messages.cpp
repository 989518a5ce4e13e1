#include "kvf/protocol/staging_messages.h"

#include <cstddef>
#include <limits>
#include <type_traits>

#include "kvf/protocol/kv_codec.h"
#include "kvf/protocol/messages.h"
#include "wire_codec.h"

namespace kvf::protocol::staging {
namespace {

// Pieces go to and from the wire as one block of u64 pairs (wire::Writer::u64_block).
static_assert(sizeof(ScatterPiece) == 16 && offsetof(ScatterPiece, bytes) == 8 &&
              std::is_trivially_copyable_v<ScatterPiece>);

enum class Type : uint16_t { kRequest = 1, kOffer = 2, kScatter = 3, kScattered = 4, kClosed = 5 };

constexpr size_t kMaxBlob = 4096;
constexpr size_t kMaxEventHandle = 256;

wire::Writer header(Type type, uint16_t version = kMinVersion) {
  wire::Writer w;
  w.u32(kMagic);
  w.u16(version);
  w.u16(static_cast<uint16_t>(type));
  return w;
}

// v2's codec fields; messages without them are written as v1.
bool has_codec(uint8_t codec, uint32_t row_bytes) {
  return codec != 0 || row_bytes != 0;
}

// The version a message with v2 fields (`coded`) and v3 fields (`handover`) is written as: the
// oldest that carries them, so peers of older versions still read what does not need newer ones.
uint16_t version_for(bool coded, bool handover) {
  return handover ? uint16_t{3} : coded ? uint16_t{2} : uint16_t{1};
}

bool codec_fields(wire::Reader& r, uint8_t& codec, uint32_t& row_bytes) {
  if (!r.u8("codec", codec) || !r.u32("row_bytes", row_bytes)) return false;
  if (codec >= kKvCodecCount) return r.fail("codec", "unknown codec " + std::to_string(codec));
  if (row_bytes > kMaxRowBytes)
    return r.fail("row_bytes", std::to_string(row_bytes) + ", at most " + std::to_string(kMaxRowBytes));
  if (codec != 0 && (row_bytes == 0 || row_bytes % 2 != 0))
    return r.fail("row_bytes", std::to_string(row_bytes) + " is no row of 16-bit values for a codec");
  return true;
}

// A byte field of at most `limit` bytes.
bool bounded_bytes(wire::Reader& r, std::string_view field, std::vector<uint8_t>& out, size_t limit) {
  if (!r.bytes(field, out)) return false;
  if (out.size() > limit)
    return r.fail(field, std::to_string(out.size()) + " bytes, at most " + std::to_string(limit));
  return true;
}

bool error_code(wire::Reader& r, std::string_view field, uint32_t& out) {
  if (!r.u32(field, out)) return false;
  if (out > static_cast<uint32_t>(ErrorCode::kUnavailable))
    return r.fail(field, "unknown error code " + std::to_string(out));
  return true;
}

}  // namespace

bool is_staging_message(std::span<const uint8_t> bytes) {
  return bytes.size() >= 4 &&
         (bytes[0] | bytes[1] << 8 | bytes[2] << 16 | static_cast<uint32_t>(bytes[3]) << 24) == kMagic;
}

std::optional<ScatterIds> scatter_ids(std::span<const uint8_t> bytes) {
  wire::Reader r(bytes, "cuda_ipc staging message");
  uint32_t magic = 0;
  uint16_t type = 0;
  ScatterIds ids;
  if (!r.u32("magic", magic) || magic != kMagic || !r.u16("version", ids.version) || !r.u16("type", type) ||
      static_cast<Type>(type) != Type::kScatter || !r.u64("sender", ids.sender) ||
      !r.u64("batch", ids.batch) || !r.u32("slot", ids.slot)) {
    return std::nullopt;
  }
  return ids;
}

Scattered refusal(const ScatterIds& ids, const Status& why) {
  // Scattered carries only the codes this build knows (decode refuses others).
  return Scattered{ids.sender, ids.batch, ids.slot, static_cast<uint32_t>(why.code()),
                   "the receiver could not read this scatter: " + why.message()};
}

std::vector<uint8_t> encode(const Message& message) {
  return std::visit(
      [](const auto& m) {
        using T = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<T, StagingRequest>) {
          const bool handover = !m.handover.empty();
          const bool coded = handover || has_codec(m.codec, m.row_bytes);
          wire::Writer w = header(Type::kRequest, version_for(coded, handover));
          w.u64(m.sender);
          w.u32(m.slots);
          w.u64(m.slot_bytes);
          w.bytes(m.reply_address);
          w.count(m.slot_events.size());
          for (const auto& e : m.slot_events) w.bytes(e);
          w.bytes(m.nccl_id);
          if (coded) {
            w.u8(m.codec);
            w.u32(m.row_bytes);
          }
          if (handover) w.bytes(m.handover);
          return w.take();
        } else if constexpr (std::is_same_v<T, StagingOffer>) {
          const bool handover = m.ready_offset != 0;
          wire::Writer w = header(Type::kOffer, version_for(false, handover));
          w.u64(m.sender);
          w.u32(m.slots);
          w.u64(m.slot_bytes);
          w.bytes(m.cuda_ipc);
          w.u32(m.error);
          w.string(m.message.substr(0, kMaxStringBytes));
          if (handover) w.u64(m.ready_offset);
          return w.take();
        } else if constexpr (std::is_same_v<T, Scatter>) {
          const bool sends = !m.sends.empty();
          const bool handover = sends || m.use != 0;
          const bool coded = handover || has_codec(m.codec, m.row_bytes);
          wire::Writer w = header(Type::kScatter, sends ? uint16_t{4} : version_for(coded, handover));
          w.u64(m.sender);
          w.u64(m.batch);
          w.u32(m.slot);
          w.reserve(4 + m.pieces.size() * sizeof(ScatterPiece) + 64);
          w.count(m.pieces.size());
          // A 64 MiB chunk of 32 KiB blocks names 2,048 pieces: one copy, not 4,096 writes (those
          // took ~95 us of the sender's progress thread a chunk; perf/RESULTS.md, session 9).
          w.u64_block(m.pieces.data(), m.pieces.size() * 2);
          if (coded) {
            w.u8(m.codec);
            w.u32(m.row_bytes);
          }
          if (handover) w.u32(m.use);
          if (sends) {
            w.count(m.sends.size());
            for (uint64_t bytes : m.sends) w.u64(bytes);
          }
          return w.take();
        } else if constexpr (std::is_same_v<T, StagingClosed>) {
          wire::Writer w = header(Type::kClosed);
          w.u64(m.sender);
          return w.take();
        } else {
          static_assert(std::is_same_v<T, Scattered>);
          wire::Writer w = header(Type::kScattered);
          w.u64(m.sender);
          w.u64(m.batch);
          w.u32(m.slot);
          w.u32(m.error);
          w.string(m.message.substr(0, kMaxStringBytes));
          return w.take();
        }
      },
      message);
}

Result<Message> decode(std::span<const uint8_t> bytes) {
  wire::Reader r(bytes, "cuda_ipc staging message");
  uint32_t magic = 0;
  uint16_t version = 0, type = 0;
  if (!r.u32("magic", magic) || magic != kMagic)
    return Status(ErrorCode::kMalformed, "cuda_ipc staging message: no staging magic");
  if (!r.u16("version", version) || !r.u16("type", type)) return r.finish();
  if (version < kMinVersion || version > kVersion) {
    return Status(ErrorCode::kUnsupportedVersion,
                  "cuda_ipc staging message version " + std::to_string(version) + ", this build speaks " +
                      std::to_string(kMinVersion) + " to " + std::to_string(kVersion));
  }
  Message out;
  switch (static_cast<Type>(type)) {
    case Type::kRequest: {
      StagingRequest m;
      uint32_t events = 0;
      if (r.u64("sender", m.sender) && r.u32("slots", m.slots) && r.u64("slot_bytes", m.slot_bytes) &&
          bounded_bytes(r, "reply_address", m.reply_address, kMaxBlob) && r.count("slot_events", 4, events)) {
        if (m.slots == 0 || m.slots > kMaxSlots || m.slot_bytes == 0 || m.slot_bytes > kMaxSlotBytes) {
          r.fail("slots", std::to_string(m.slots) + " slots of " + std::to_string(m.slot_bytes) + " bytes");
        } else if (m.reply_address.empty()) {
          r.fail("reply_address", "empty");
        } else if (events != m.slots && events != 0) {
          r.fail("slot_events", "not one event per slot");
        }
        m.slot_events.resize(r.ok() ? events : 0);
        for (auto& e : m.slot_events) {
          if (bounded_bytes(r, "slot_events[]", e, kMaxEventHandle) && e.empty())
            r.fail("slot_events[]", "empty");
        }
        if (bounded_bytes(r, "nccl_id", m.nccl_id, kMaxEventHandle) && !m.nccl_id.empty() &&
            !m.slot_events.empty())
          r.fail("nccl_id", "a staging request names slot events or an NCCL communicator, not both");
        if (r.ok() && version >= 2 && codec_fields(r, m.codec, m.row_bytes) && m.codec != 0 &&
            (!m.slot_events.empty() || !m.nccl_id.empty()))
          r.fail("codec", "a codec on GPU staging (slot events or NCCL): only host staging encodes");
        if (r.ok() && version >= 3 && bounded_bytes(r, "handover", m.handover, kMaxBlob)) {
          if (m.handover.empty())
            r.fail("handover", "empty in a v3 request (a request without hand-over is written as v1 or v2)");
          else if (m.slot_events.empty() && m.nccl_id.empty())
            r.fail("handover",
                   "a hand-over on host staging: only GPU staging (slot events or NCCL) hands over");
        }
      }
      out = std::move(m);
      break;
    }
    case Type::kOffer: {
      StagingOffer m;
      if (r.u64("sender", m.sender) && r.u32("slots", m.slots) && r.u64("slot_bytes", m.slot_bytes) &&
          bounded_bytes(r, "cuda_ipc", m.cuda_ipc, kMaxBlob) && error_code(r, "error", m.error) &&
          r.string("message", m.message)) {
        if (m.error == 0 && (m.cuda_ipc.empty() || m.slots == 0 || m.slots > kMaxSlots || m.slot_bytes == 0 ||
                             m.slot_bytes > kMaxSlotBytes))
          r.fail("slots", "an offer without usable slots");
        // v3: the ready counters, one uint32 per slot, after the slots (bounded above, so
        // slots x slot_bytes cannot overflow once the offer is accepted).
        if (r.ok() && version >= 3 && r.u64("ready_offset", m.ready_offset)) {
          const uint64_t slots_end = m.error == 0 ? uint64_t{m.slots} * m.slot_bytes : 0;
          if (m.ready_offset == 0)
            r.fail("ready_offset", "0 in a v3 offer (an offer without hand-over is written as v1)");
          else if (m.error != 0)
            r.fail("ready_offset", "ready counters in a refusal");
          else if (m.ready_offset % 4 != 0)
            r.fail("ready_offset", std::to_string(m.ready_offset) + " is not 4-byte aligned");
          else if (m.ready_offset < slots_end)
            r.fail("ready_offset", std::to_string(m.ready_offset) + " lies inside the " +
                                       std::to_string(m.slots) + " slots of " + std::to_string(m.slot_bytes) +
                                       " bytes");
          else if (m.ready_offset > std::numeric_limits<uint64_t>::max() - uint64_t{4} * m.slots)
            r.fail("ready_offset", std::to_string(m.ready_offset) + ": the counters pass the address space");
        }
      }
      out = std::move(m);
      break;
    }
    case Type::kScatter: {
      Scatter m;
      uint32_t count = 0;
      if (r.u64("sender", m.sender) && r.u64("batch", m.batch) && r.u32("slot", m.slot) &&
          r.count("pieces", 16, count)) {
        if (count == 0 || count > kMaxPieces) r.fail("pieces", std::to_string(count) + " pieces");
        m.pieces.resize(r.ok() ? count : 0);
        uint64_t total = 0;
        if (!m.pieces.empty()) r.u64_block("pieces", m.pieces.data(), m.pieces.size() * 2);
        for (ScatterPiece& p : m.pieces) {
          if (!r.ok()) break;
          if (p.bytes == 0 || p.bytes > kMaxSlotBytes || p.destination == 0 ||
              p.destination > std::numeric_limits<uint64_t>::max() - p.bytes) {
            r.fail("pieces[]", std::to_string(p.bytes) + " bytes at " + std::to_string(p.destination));
            break;
          }
          total += p.bytes;
        }
        if (r.ok() && version >= 2) codec_fields(r, m.codec, m.row_bytes);
        // v4 carries `use` too, and 0 there (sends without a hand-over) is the nccl path's usual case.
        if (r.ok() && version >= 3 && r.u32("use", m.use) && version == 3 && m.use == 0)
          r.fail("use", "0 in a v3 scatter (a scatter without hand-over is written as v1 or v2)");
        uint32_t sends = 0;
        if (r.ok() && version >= 4 && r.count("sends", 8, sends)) {
          if (sends < 2 || sends > kMaxSends) {
            r.fail("sends", std::to_string(sends) + " sends (a v4 scatter names 2 to " +
                                std::to_string(kMaxSends) + "; one send is written as v1 to v3)");
          } else if (m.codec != 0) {
            r.fail("sends", "sends of an encoded slot: only raw GPU staging (nccl) sends in parts");
          } else {
            m.sends.resize(sends);
            uint64_t sent = 0;
            for (uint64_t& size : m.sends) {
              if (!r.u64("sends[]", size)) break;
              if (size == 0 || size > kMaxSlotBytes) {
                r.fail("sends[]", std::to_string(size) + " bytes");
                break;
              }
              sent += size;
            }
            if (r.ok() && sent != total)
              r.fail("sends", std::to_string(sent) + " bytes sent for pieces of " + std::to_string(total));
          }
        }
        // Raw bytes: a codec's pieces decode to up to twice what the slot holds.
        if (r.ok() && total > (m.codec == 0 ? kMaxSlotBytes : 2 * kMaxSlotBytes))
          r.fail("pieces", "larger than any slot");
      }
      out = std::move(m);
      break;
    }
    case Type::kScattered: {
      Scattered m;
      if (r.u64("sender", m.sender) && r.u64("batch", m.batch) && r.u32("slot", m.slot) &&
          error_code(r, "error", m.error)) {
        r.string("message", m.message);
      }
      out = std::move(m);
      break;
    }
    case Type::kClosed: {
      StagingClosed m;
      r.u64("sender", m.sender);
      out = m;
      break;
    }
    default:
      return Status(ErrorCode::kMalformed, "cuda_ipc staging message: unknown type " + std::to_string(type));
  }
  if (Status s = r.finish(); !s.ok()) return s;
  return out;
}

}  // namespace kvf::protocol::staging
