// Private byte writer/reader for control-message payloads. Little-endian fixed-width integers,
// u32-length-prefixed strings and vectors. The reader never reads past its span and never
// allocates more than the bytes left could hold, so hostile counts cannot cause huge allocations;
// the first failure is kept as a kMalformed Status naming the field ("RecvPlan.dst_blocks: ...").
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvf/protocol/status.h"

namespace kvf::protocol::wire {

// "0x0000abcd": magic numbers, checksums and flag bits in error messages.
std::string hex32(uint32_t v);

class Writer {
 public:
  void u8(uint8_t v) { out_.push_back(v); }
  void u16(uint16_t v) { put_le(v, 2); }
  void u32(uint32_t v) { put_le(v, 4); }
  void u64(uint64_t v) { put_le(v, 8); }
  void boolean(bool v) { u8(v ? 1 : 0); }
  void count(size_t n);  // u32; callers keep counts below 2^32 (frames are capped far lower)
  void string(std::string_view s);
  void bytes(std::span<const uint8_t> b);
  void raw(std::span<const uint8_t> b) { out_.insert(out_.end(), b.begin(), b.end()); }
  // `count` u64 values laid out one after another at `values` (an array of u64, or of structs
  // of u64 fields only), each little-endian: one copy on a little-endian host, for the long piece
  // lists of the staging messages.
  void u64_block(const void* values, size_t count);
  void reserve(size_t bytes) { out_.reserve(out_.size() + bytes); }

  std::vector<uint8_t>& buffer() { return out_; }
  std::vector<uint8_t> take() { return std::move(out_); }

 private:
  void put_le(uint64_t v, int n) {
    const size_t at = out_.size();
    out_.resize(at + static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) out_[at + static_cast<size_t>(i)] = static_cast<uint8_t>(v >> (8 * i));
  }
  std::vector<uint8_t> out_;
};

class Reader {
 public:
  // `message` names the outermost thing being decoded ("RecvPlan") in error messages.
  Reader(std::span<const uint8_t> in, std::string_view message) : in_(in), message_(message) {}

  // Each getter returns false (and leaves `out` untouched) once any read has failed.
  bool u8(std::string_view field, uint8_t& out);
  bool u16(std::string_view field, uint16_t& out);
  bool u32(std::string_view field, uint32_t& out);
  bool u64(std::string_view field, uint64_t& out);
  bool boolean(std::string_view field, bool& out);
  // A u32 item count, checked against the bytes left: count * min_item_bytes <= remaining.
  bool count(std::string_view field, size_t min_item_bytes, uint32_t& out);
  bool string(std::string_view field, std::string& out);  // at most kMaxStringBytes
  bool bytes(std::string_view field, std::vector<uint8_t>& out);
  // `count` little-endian u64 values into `out` (room for count x 8 bytes), as Writer::u64_block.
  bool u64_block(std::string_view field, void* out, size_t count);

  // Records a failure found by the caller (bad enum value, ...); the first failure wins.
  bool fail(std::string_view field, const std::string& what);
  // Error messages of the fields read until leave() name the enclosing struct or list element,
  // e.g. "RunResult.target.ucx_rkey" or "RegionGrant.layer_regions[3].ucx_rkey".
  static constexpr size_t kNoIndex = static_cast<size_t>(-1);
  void enter(std::string_view name, size_t index = kNoIndex);
  void leave() { in_scope_ = false; }

  // After the last field: fails on trailing bytes; returns the first failure, if any.
  Status finish();
  bool ok() const { return status_.ok(); }
  size_t remaining() const { return in_.size() - pos_; }

 private:
  bool take(std::string_view field, size_t n, const uint8_t*& p);
  uint64_t get_le(const uint8_t* p, int n) const {
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) v |= uint64_t{p[i]} << (8 * i);
    return v;
  }

  std::span<const uint8_t> in_;
  size_t pos_ = 0;
  std::string_view message_;
  std::string_view scope_;
  size_t index_ = kNoIndex;
  bool in_scope_ = false;
  Status status_;
};

}  // namespace kvf::protocol::wire
