// Small helpers of the benchmark tools: size parsing ("4K", "1M", "1GiB"), percentiles, and the
// KV layout of a layers-mode request. Free functions, no state.
#pragma once

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kvf/protocol/kv_layout.h"
#include "kvf/protocol/status.h"

namespace kvf::perf {

inline std::optional<uint64_t> parse_size(std::string_view text) {
  if (text.empty() || !std::isdigit(static_cast<unsigned char>(text[0]))) return std::nullopt;
  uint64_t value = 0;
  size_t i = 0;
  for (; i < text.size() && std::isdigit(static_cast<unsigned char>(text[i])); ++i) {
    if (value > (UINT64_MAX - 9) / 10) return std::nullopt;
    value = value * 10 + static_cast<uint64_t>(text[i] - '0');
  }
  std::string unit(text.substr(i));
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  uint64_t mult = 1;
  if (unit.empty() || unit == "B")
    mult = 1;
  else if (unit == "K" || unit == "KB" || unit == "KIB")
    mult = 1ull << 10;
  else if (unit == "M" || unit == "MB" || unit == "MIB")
    mult = 1ull << 20;
  else if (unit == "G" || unit == "GB" || unit == "GIB")
    mult = 1ull << 30;
  else
    return std::nullopt;
  if (value > UINT64_MAX / mult) return std::nullopt;
  return value * mult;
}

inline Result<std::vector<uint64_t>> parse_size_list(std::string_view text) {
  std::vector<uint64_t> out;
  size_t start = 0;
  while (start <= text.size()) {
    size_t comma = text.find(',', start);
    std::string_view item =
        text.substr(start, comma == std::string_view::npos ? std::string_view::npos : comma - start);
    auto v = parse_size(item);
    if (!v || *v == 0)
      return Status(ErrorCode::kInvalidArgument, "bad size '" + std::string(item) + "' (use e.g. 4K,64K,1M)");
    out.push_back(*v);
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return out;
}

inline double percentile(std::vector<double> values, double pct) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  double rank = pct / 100.0 * static_cast<double>(values.size() - 1);
  auto lo = static_cast<size_t>(rank);
  size_t hi = std::min(lo + 1, values.size() - 1);
  double frac = rank - static_cast<double>(lo);
  return values[lo] * (1 - frac) + values[hi] * frac;
}

// The layout of a layers-mode request: `layers` layer buffers of `blocks` blocks, each block a K
// and a V part of `block_bytes` (FlashAttention order). Byte-for-byte the Llama-3-8B shape for 32
// layers, 32K parts (16 tokens x 8 KV heads x 128 dims x bf16). The pattern generator fills 8-byte
// words, so block_bytes must be a positive multiple of 8.
inline Result<protocol::KvLayout> layers_layout(uint32_t layers, uint32_t blocks,
                                                std::string_view block_bytes) {
  auto part = parse_size(block_bytes);
  if (!part || *part == 0 || *part % 8 != 0 || *part / 2 > UINT32_MAX) {
    return Status(ErrorCode::kInvalidArgument,
                  "--block-bytes must be a positive multiple of 8, got '" + std::string(block_bytes) + "'");
  }
  protocol::KvLayoutDesc desc;
  desc.kind = protocol::KvLayoutKind::kFlashAttention;
  desc.num_layers = layers;
  desc.num_blocks = blocks;
  desc.block_tokens = 1;
  desc.kv_heads = 1;
  desc.dtype_bytes = 2;
  desc.head_dim = static_cast<uint32_t>(*part / 2);
  auto layout = protocol::KvLayout::create(desc);
  if (!layout.ok()) return Status(ErrorCode::kInvalidArgument, "layout: " + layout.status().message());
  return layout;
}

// Writes `json` (an nlohmann::json: pretty, newline-terminated) to `path`. A file that cannot be
// opened or written is an error naming it, never a silent nothing.
template <typename Json>
Status write_json_file(const std::string& path, const Json& json) {
  std::ofstream out(path);
  if (out) out << json.dump(2) << "\n" << std::flush;
  if (!out) return Status(ErrorCode::kInvalidArgument, "cannot write " + path);
  return Status::Ok();
}

}  // namespace kvf::perf
