#include "wire_codec.h"

#include <bit>
#include <cstdio>
#include <cstring>

#include "kvf/protocol/messages.h"

namespace kvf::protocol::wire {

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

void Writer::count(size_t n) {
  u32(static_cast<uint32_t>(n));
}

void Writer::u64_block(const void* values, size_t count) {
  const auto* bytes = static_cast<const uint8_t*>(values);
  if constexpr (std::endian::native == std::endian::little) {
    raw({bytes, count * 8});
  } else {
    for (size_t i = 0; i < count; ++i) {
      uint64_t v = 0;
      std::memcpy(&v, bytes + i * 8, 8);
      u64(v);
    }
  }
}

void Writer::string(std::string_view s) {
  count(s.size());
  raw({reinterpret_cast<const uint8_t*>(s.data()), s.size()});
}

void Writer::bytes(std::span<const uint8_t> b) {
  count(b.size());
  raw(b);
}

bool Reader::fail(std::string_view field, const std::string& what) {
  if (!status_.ok()) return false;  // keep the first failure: later ones are consequences
  std::string where(message_);
  if (in_scope_) {
    where += '.';
    where += scope_;
    if (index_ != kNoIndex) where += '[' + std::to_string(index_) + ']';
  }
  where += '.';
  where += field;
  status_ = Status(ErrorCode::kMalformed, where + ": " + what);
  return false;
}

void Reader::enter(std::string_view name, size_t index) {
  scope_ = name;
  index_ = index;
  in_scope_ = true;
}

bool Reader::take(std::string_view field, size_t n, const uint8_t*& p) {
  if (!status_.ok()) return false;
  if (n > remaining()) {
    return fail(field, "truncated: needs " + std::to_string(n) + " bytes, " + std::to_string(remaining()) +
                           " remaining");
  }
  p = in_.data() + pos_;
  pos_ += n;
  return true;
}

bool Reader::u8(std::string_view field, uint8_t& out) {
  const uint8_t* p = nullptr;
  if (!take(field, 1, p)) return false;
  out = p[0];
  return true;
}

bool Reader::u16(std::string_view field, uint16_t& out) {
  const uint8_t* p = nullptr;
  if (!take(field, 2, p)) return false;
  out = static_cast<uint16_t>(get_le(p, 2));
  return true;
}

bool Reader::u32(std::string_view field, uint32_t& out) {
  const uint8_t* p = nullptr;
  if (!take(field, 4, p)) return false;
  out = static_cast<uint32_t>(get_le(p, 4));
  return true;
}

bool Reader::u64_block(std::string_view field, void* out, size_t count) {
  const uint8_t* p = nullptr;
  if (count > remaining() / 8)
    return fail(field, "truncated: " + std::to_string(count) + " values do not fit");
  if (!take(field, count * 8, p)) return false;
  auto* dst = static_cast<uint8_t*>(out);
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(dst, p, count * 8);
  } else {
    for (size_t i = 0; i < count; ++i) {
      const uint64_t v = get_le(p + i * 8, 8);
      std::memcpy(dst + i * 8, &v, 8);
    }
  }
  return true;
}

bool Reader::u64(std::string_view field, uint64_t& out) {
  const uint8_t* p = nullptr;
  if (!take(field, 8, p)) return false;
  out = get_le(p, 8);
  return true;
}

bool Reader::boolean(std::string_view field, bool& out) {
  uint8_t v = 0;
  if (!u8(field, v)) return false;
  // Only 0 and 1, so that every accepted payload re-encodes to the same bytes.
  if (v > 1) return fail(field, "bool byte " + std::to_string(v) + " is neither 0 nor 1");
  out = v == 1;
  return true;
}

bool Reader::count(std::string_view field, size_t min_item_bytes, uint32_t& out) {
  uint32_t n = 0;
  if (!u32(field, n)) return false;
  // Checked before any allocation: a hostile count must not make us reserve gigabytes.
  // n < 2^32 and min_item_bytes is a small constant, so the product cannot overflow 64 bits.
  if (uint64_t{n} * min_item_bytes > remaining()) {
    std::string what = "count " + std::to_string(n);
    if (min_item_bytes > 1) what += " of " + std::to_string(min_item_bytes) + "-byte items";
    return fail(field, what + " exceeds remaining " + std::to_string(remaining()) + " bytes");
  }
  out = n;
  return true;
}

bool Reader::string(std::string_view field, std::string& out) {
  uint32_t n = 0;
  if (!count(field, 1, n)) return false;
  if (n > kMaxStringBytes) {
    return fail(field,
                "string length " + std::to_string(n) + " exceeds limit " + std::to_string(kMaxStringBytes));
  }
  const uint8_t* p = nullptr;
  if (!take(field, n, p)) return false;
  out.assign(reinterpret_cast<const char*>(p), n);
  return true;
}

bool Reader::bytes(std::string_view field, std::vector<uint8_t>& out) {
  uint32_t n = 0;
  if (!count(field, 1, n)) return false;
  const uint8_t* p = nullptr;
  if (!take(field, n, p)) return false;
  out.assign(p, p + n);
  return true;
}

Status Reader::finish() {
  if (status_.ok() && remaining() != 0) {
    status_ = Status(ErrorCode::kMalformed, std::string(message_) + ": " + std::to_string(remaining()) +
                                                " trailing bytes after the payload");
  }
  return status_;
}

}  // namespace kvf::protocol::wire
