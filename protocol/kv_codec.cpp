#include "kvf/protocol/kv_codec.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

namespace kvf::protocol {
namespace {

constexpr KvCodec kAllCodecs[] = {KvCodec::kIdentity, KvCodec::kZstd, KvCodec::kLz4,  KvCodec::kInt8,
                                  KvCodec::kFp8,      KvCodec::kInt4, KvCodec::kInt2, KvCodec::kDrop};
constexpr uint64_t kMaxRawBytes = 1ull << 40;

template <typename T>
void put(std::span<uint8_t> out, size_t at, T value) {
  std::memcpy(out.data() + at, &value, sizeof(T));
}
template <typename T>
T get(std::span<const uint8_t> in, size_t at) {
  T value;
  std::memcpy(&value, in.data() + at, sizeof(T));
  return value;
}

Status malformed(const std::string& what) {
  return Status(ErrorCode::kMalformed, "encoded KV chunk: " + what);
}

uint32_t kivi_bits(KvCodec codec) {
  return codec == KvCodec::kInt4 ? 4 : 2;
}

}  // namespace

std::string_view codec_name(KvCodec codec) {
  switch (codec) {
    case KvCodec::kIdentity:
      return "identity";
    case KvCodec::kZstd:
      return "zstd";
    case KvCodec::kLz4:
      return "lz4";
    case KvCodec::kInt8:
      return "int8";
    case KvCodec::kFp8:
      return "fp8";
    case KvCodec::kInt4:
      return "int4";
    case KvCodec::kInt2:
      return "int2";
    case KvCodec::kDrop:
      return "drop";
  }
  return "unknown";
}

Result<KvCodec> parse_codec(std::string_view name) {
  for (KvCodec c : kAllCodecs) {
    if (codec_name(c) == name) return c;
  }
  return Status(ErrorCode::kMalformed, "unknown codec '" + std::string(name) +
                                           "' (identity, zstd, lz4, int8, fp8, int4, int2 or drop)");
}

Result<KvCodecParams> parse_codec_spec(std::string_view spec) {
  KvCodecParams params;
  const size_t colon = spec.find(':');
  auto codec = parse_codec(spec.substr(0, colon));
  if (!codec.ok()) return codec.status();
  params.codec = codec.value();
  if (colon == std::string_view::npos) return params;
  std::string_view rest = spec.substr(colon + 1);
  auto bad = [&](const std::string& why) {
    return Status(ErrorCode::kMalformed, "codec '" + std::string(spec) + "': " + why);
  };
  while (!rest.empty()) {
    const size_t comma = rest.find(',');
    const std::string_view option = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view{} : rest.substr(comma + 1);
    const size_t eq = option.find('=');
    if (eq == std::string_view::npos) return bad("option '" + std::string(option) + "' is not key=value");
    const std::string key(option.substr(0, eq));
    const std::string value(option.substr(eq + 1));
    char* end = nullptr;
    errno = 0;
    if (key == "keep") {
      const float v = std::strtof(value.c_str(), &end);
      if (value.empty() || *end != '\0' || errno != 0 || !std::isfinite(v))
        return bad("keep=" + value + " is not a number");
      params.keep_fraction = v;
      continue;
    }
    const long long v = std::strtoll(value.c_str(), &end, 10);
    if (value.empty() || *end != '\0' || errno != 0 || v < 0 || v > (1ll << 30))
      return bad(key + "=" + value + " is not a whole number in range");
    if (key == "r") {
      params.residual_tokens = static_cast<uint32_t>(v);
    } else if (key == "g") {
      params.group = static_cast<uint32_t>(v);
    } else if (key == "level") {
      params.zstd_level = static_cast<int>(v);
    } else {
      return bad("unknown option '" + key + "' (r, g, keep, level)");
    }
  }
  return params;
}

bool codec_is_lossless(KvCodec codec) {
  return codec == KvCodec::kIdentity || codec == KvCodec::kZstd || codec == KvCodec::kLz4;
}

bool codec_is_fixed_rate(KvCodec codec) {
  return codec == KvCodec::kIdentity || codec == KvCodec::kInt8 || codec == KvCodec::kFp8 ||
         codec == KvCodec::kInt4 || codec == KvCodec::kInt2;
}

uint64_t KvChunkGeometry::tile_bytes() const {
  return uint64_t{tokens()} * channels * dtype_bytes;
}
uint64_t KvChunkGeometry::raw_bytes() const {
  return uint64_t{layers} * parts * tile_bytes();
}

Status KvChunkGeometry::validate() const {
  auto bad = [](const std::string& what) {
    return Status(ErrorCode::kInvalidArgument, "KV chunk geometry: " + what);
  };
  if (layers == 0 || blocks == 0 || block_tokens == 0 || channels == 0) {
    return bad("layers, blocks, block_tokens and channels must all be non-zero");
  }
  if (parts != 1 && parts != 2)
    return bad("parts must be 1 (MLA) or 2 (K and V), not " + std::to_string(parts));
  if (dtype_bytes != 2)
    return bad("codecs take 16-bit (bf16) values, not " + std::to_string(dtype_bytes) + "-byte ones");
  const uint64_t tokens64 = uint64_t{blocks} * block_tokens;
  if (tokens64 > (1u << 20)) return bad("a chunk of " + std::to_string(tokens64) + " tokens is past 2^20");
  if (channels > (1u << 20)) return bad("channels past 2^20");
  if (uint64_t{layers} * parts * tokens64 * channels * dtype_bytes > kMaxRawBytes)
    return bad("a chunk past 2^40 bytes");
  return Status::Ok();
}

uint32_t drop_kept_tokens(const KvCodecParams& params, const KvChunkGeometry& geometry) {
  const double kept = std::ceil(static_cast<double>(params.keep_fraction) * geometry.tokens());
  if (!(kept >= 1.0)) return 1;
  if (kept >= geometry.tokens()) return geometry.tokens();
  return static_cast<uint32_t>(kept);
}

Status validate_codec(const KvCodecParams& params, const KvChunkGeometry& geometry) {
  if (Status s = geometry.validate(); !s.ok()) return s;
  const auto bad = [&](const std::string& what) {
    return Status(ErrorCode::kInvalidArgument,
                  "codec " + std::string(codec_name(params.codec)) + ": " + what);
  };
  switch (params.codec) {
    case KvCodec::kIdentity:
    case KvCodec::kInt8:
    case KvCodec::kFp8:
    case KvCodec::kLz4:
      return Status::Ok();
    case KvCodec::kZstd:
      if (params.zstd_level < 1 || params.zstd_level > 19) return bad("zstd level must be in 1..19");
      return Status::Ok();
    case KvCodec::kInt4:
    case KvCodec::kInt2: {
      if (params.group < 8 || params.group % 8 != 0 || params.group > 65535) {
        return bad("group must be a multiple of 8 in 8..65535, not " + std::to_string(params.group));
      }
      if (params.residual_tokens > geometry.tokens() || params.residual_tokens > 65535) {
        return bad("residual_tokens " + std::to_string(params.residual_tokens) +
                   " is more than the chunk's " + std::to_string(geometry.tokens()) + " tokens");
      }
      if ((geometry.tokens() - params.residual_tokens) % params.group != 0) {
        return bad("tokens - residual_tokens (" + std::to_string(geometry.tokens() - params.residual_tokens) +
                   ") must be a multiple of the group (" + std::to_string(params.group) + ")");
      }
      if (geometry.parts == 2 && geometry.channels % params.group != 0) {
        return bad("channels (" + std::to_string(geometry.channels) + ") must be a multiple of the group (" +
                   std::to_string(params.group) + ")");
      }
      return Status::Ok();
    }
    case KvCodec::kDrop:
      if (!(params.keep_fraction > 0.0f && params.keep_fraction <= 1.0f))
        return bad("keep_fraction must be in (0, 1]");
      if (geometry.tokens() > 65536) return bad("token positions are 16-bit: at most 65536 tokens a chunk");
      return Status::Ok();
  }
  return bad("unknown codec");
}

uint64_t fixed_segment_bytes(const KvCodecParams& params, const KvChunkGeometry& geometry, uint32_t part) {
  const uint64_t t = geometry.tokens();
  const uint64_t c = geometry.channels;
  switch (params.codec) {
    case KvCodec::kIdentity:
      return t * c * 2;
    case KvCodec::kInt8:
    case KvCodec::kFp8:
      return 4 * t + t * c;
    case KvCodec::kInt4:
    case KvCodec::kInt2: {
      const uint64_t bits = kivi_bits(params.codec);
      const uint64_t r = params.residual_tokens;
      const uint64_t q = t - r;
      const uint64_t g = params.group;
      const uint64_t meta = part == 0 ? (q / g) * c * 4 : q * (c / g) * 4;
      return meta + q * c * bits / 8 + r * c * 2;
    }
    default:
      return 0;
  }
}

uint64_t fixed_encoded_bytes(const KvCodecParams& params, const KvChunkGeometry& geometry) {
  uint64_t payload = 0;
  for (uint32_t part = 0; part < geometry.parts; ++part) {
    payload += uint64_t{geometry.layers} * align_segment(fixed_segment_bytes(params, geometry, part));
  }
  return kKvChunkHeaderBytes + 16ull * geometry.layers * geometry.parts + payload;
}

void write_chunk_header(const KvChunkHeader& h, std::span<uint8_t> out) {
  std::memset(out.data(), 0, kKvChunkHeaderBytes);
  put<uint32_t>(out, 0, kKvChunkMagic);
  put<uint16_t>(out, 4, kKvChunkVersion);
  put<uint8_t>(out, 6, static_cast<uint8_t>(h.params.codec));
  put<uint32_t>(out, 8, h.geometry.layers);
  put<uint16_t>(out, 12, static_cast<uint16_t>(h.geometry.parts));
  put<uint16_t>(out, 14, static_cast<uint16_t>(h.geometry.dtype_bytes));
  put<uint32_t>(out, 16, h.geometry.blocks);
  put<uint32_t>(out, 20, h.geometry.block_tokens);
  put<uint32_t>(out, 24, h.geometry.channels);
  // Parameters a codec does not use are written as zero, so one chunk has one encoding.
  if (h.params.codec == KvCodec::kInt4 || h.params.codec == KvCodec::kInt2) {
    put<uint16_t>(out, 28, static_cast<uint16_t>(h.params.group));
    put<uint16_t>(out, 30, static_cast<uint16_t>(h.params.residual_tokens));
  }
  put<uint32_t>(out, 32, h.kept_tokens);
  if (h.params.codec == KvCodec::kDrop) put<float>(out, 36, h.params.keep_fraction);
  put<float>(out, 40, h.key_error);
  put<float>(out, 44, h.value_error);
  put<uint64_t>(out, 48, h.raw_bytes);
  put<uint64_t>(out, 56, h.payload_bytes);
}

Result<KvChunkHeader> read_chunk_header(std::span<const uint8_t> in) {
  if (in.size() < kKvChunkHeaderBytes) {
    return malformed(std::to_string(in.size()) + " bytes, shorter than the 64-byte header");
  }
  if (get<uint32_t>(in, 0) != kKvChunkMagic) return malformed("bad magic (not an encoded chunk)");
  if (const auto v = get<uint16_t>(in, 4); v != kKvChunkVersion) {
    return Status(ErrorCode::kUnsupportedVersion,
                  "encoded KV chunk: version " + std::to_string(v) + " (this build reads version 1)");
  }
  const uint8_t codec = get<uint8_t>(in, 6);
  if (codec >= kKvCodecCount) return malformed("unknown codec id " + std::to_string(codec));
  if (get<uint8_t>(in, 7) != 0) return malformed("reserved byte is not zero");
  KvChunkHeader h;
  h.params.codec = static_cast<KvCodec>(codec);
  h.geometry.layers = get<uint32_t>(in, 8);
  h.geometry.parts = get<uint16_t>(in, 12);
  h.geometry.dtype_bytes = get<uint16_t>(in, 14);
  h.geometry.blocks = get<uint32_t>(in, 16);
  h.geometry.block_tokens = get<uint32_t>(in, 20);
  h.geometry.channels = get<uint32_t>(in, 24);
  h.params.group = get<uint16_t>(in, 28);
  h.params.residual_tokens = get<uint16_t>(in, 30);
  h.kept_tokens = get<uint32_t>(in, 32);
  h.params.keep_fraction = get<float>(in, 36);
  h.key_error = get<float>(in, 40);
  h.value_error = get<float>(in, 44);
  h.raw_bytes = get<uint64_t>(in, 48);
  h.payload_bytes = get<uint64_t>(in, 56);
  if (h.params.codec != KvCodec::kInt4 && h.params.codec != KvCodec::kInt2) {
    if (h.params.group != 0 || h.params.residual_tokens != 0)
      return malformed("group/residual set for a non-KIVI codec");
    h.params.group = KvCodecParams{}.group;
  }
  if (h.params.codec != KvCodec::kDrop) {
    if (h.params.keep_fraction != 0.0f)
      return malformed("keep_fraction set for a codec that keeps every token");
    h.params.keep_fraction = KvCodecParams{}.keep_fraction;
  }
  if (Status s = validate_codec(h.params, h.geometry); !s.ok()) return malformed(s.message());
  if (h.raw_bytes != h.geometry.raw_bytes()) return malformed("raw_bytes does not match the geometry");
  const uint32_t want_kept =
      h.params.codec == KvCodec::kDrop ? drop_kept_tokens(h.params, h.geometry) : h.geometry.tokens();
  if (h.kept_tokens != want_kept)
    return malformed("kept_tokens " + std::to_string(h.kept_tokens) + ", expected " +
                     std::to_string(want_kept));
  if (!std::isfinite(h.key_error) || !std::isfinite(h.value_error) || h.key_error < 0 || h.value_error < 0) {
    return malformed("error estimates must be finite and non-negative");
  }
  const uint64_t room = in.size() - kKvChunkHeaderBytes;
  if (h.table_bytes() > room || h.payload_bytes > room - h.table_bytes()) {
    return malformed("says " + std::to_string(h.encoded_bytes()) + " bytes, but " +
                     std::to_string(in.size()) + " are there (truncated)");
  }
  if (codec_is_fixed_rate(h.params.codec) && h.encoded_bytes() != fixed_encoded_bytes(h.params, h.geometry)) {
    return malformed("payload size does not match the codec's fixed size");
  }
  return h;
}

void write_chunk_segment(const KvChunkHeader& header, std::span<uint8_t> out, uint32_t index,
                         KvSegment segment) {
  (void)header;
  put<uint64_t>(out, kKvChunkHeaderBytes + 16ull * index, segment.offset);
  put<uint64_t>(out, kKvChunkHeaderBytes + 16ull * index + 8, segment.length);
}

Result<KvSegment> read_chunk_segment(const KvChunkHeader& header, std::span<const uint8_t> in,
                                     uint32_t index) {
  // In 64 bits: layers * parts can pass 2^32 for a header that claims a huge table.
  if (index >= uint64_t{header.geometry.layers} * header.geometry.parts)
    return malformed("segment index out of range");
  KvSegment s;
  s.offset = get<uint64_t>(in, kKvChunkHeaderBytes + 16ull * index);
  s.length = get<uint64_t>(in, kKvChunkHeaderBytes + 16ull * index + 8);
  if (s.offset % kKvSegmentAlign != 0)
    return malformed("segment " + std::to_string(index) + " is not 16-byte aligned");
  if (s.offset > header.payload_bytes || s.length > header.payload_bytes - s.offset) {
    return malformed("segment " + std::to_string(index) + " runs past the payload");
  }
  if (codec_is_fixed_rate(header.params.codec) &&
      s.length != fixed_segment_bytes(header.params, header.geometry, index % header.geometry.parts)) {
    return malformed("segment " + std::to_string(index) + " has the wrong length for its codec");
  }
  return s;
}

}  // namespace kvf::protocol
