// KV codecs: their names, parameters, and the self-describing format of an encoded chunk, shared
// by every process that stores, moves or loads compressed KV (engines, daemons, routers). The
// codecs themselves live in gpudirect/ (kv_codec.h: CPU; kv_codec_cuda.h: GPU); this header only
// says what the bytes mean, so that any side can check an encoded chunk before trusting it.
//
// A chunk's raw bytes are in the store's order: for each layer, for each of its blocks, for each
// part (K, V; one latent for MLA), block_tokens x channels 16-bit values (bf16), token-major
// (channels = kv_heads * head_dim). A codec sees each (layer, part) as one tile: a
// tokens x channels matrix (tokens = blocks * block_tokens, the blocks in chunk order).
//
// Encoded chunk, version 1 (little-endian):
//   [0, 64)   KvChunkHeader (below, byte for byte)
//   [64, 64 + 16 * layers * parts)  segment table: per (layer, part), layer-major, {u64 offset from
//             the payload's start, u64 length}
//   payload   the segments, in table order, contiguous, each starting at a multiple of 16 bytes
// Segment of one tile (T tokens, C channels, x = the bf16 values as floats):
//   identity  the tile's bytes.
//   zstd/lz4  compress(byte_shuffle(tile)); byte_shuffle = every value's low byte in order, then
//             every high byte (zstd at the params' level; lz4 default).
//   int8      T float32 scales (absmax of the token's row / 127; 0 for an all-zero row), then T x C
//             int8: clamp(round_even(x / scale), -127, 127) (0 where the scale is 0). Decoding:
//             x = code * scale, rounded to bf16.
//   fp8       T float32 scales (absmax / 448), then T x C fp8 e4m3 bytes of x / scale (round to
//             nearest even, saturating at +-448; never NaN; 0 where the scale is 0). Decoding:
//             x = e4m3_to_float(code) * scale, rounded to bf16.
//   int4/int2 KIVI: b bits, L = 2^b - 1 levels, G = group, R = residual_tokens, Q = T - R (a multiple
//             of G). Keys (part 0; the MLA latent too) per channel over groups of G tokens: for each
//             group g < Q/G, for each channel c: {fp16 min, fp16 scale}; then the codes, for each g,
//             for each c, the G tokens' codes. Values (part 1) per token over groups of G channels
//             (C a multiple of G): for each token t < Q, for each channel group: {fp16 min, fp16
//             scale}; then the codes in [token][channel] order. Codes are packed little-endian, the
//             first value in the lowest bits. min = the group's min rounded to fp16, scale = (max -
//             min) / L rounded to fp16, with that rounded min, code = clamp(round_even((x - min) *
//             r), 0, L) with the rounded min and r = 1 / the rounded scale (a float division, once a
//             group; 0 when that scale is 0, and so is the code). A min or max of
//             zero counts as +0 (take min + 0.0f and max + 0.0f): -0 and +0 compare equal, so which
//             one a reduction returns depends on its order, and the CPU and GPU reduce in different
//             orders. Then the last R tokens' rows as raw bf16. Decoding: x = min + code * scale (a
//             multiply, then an add: never fused), rounded to bf16.
//   drop      token dropping: keep K = kept_tokens rows of each layer, ranked by the L2 norm of the
//             token's key row (float sums over channels in order; ties keep the earlier token).
//             Segment: u32 K, u32 0, K u16 token positions ascending (padded to 8 bytes), K rows of
//             raw bf16. The value segment keeps the same positions. Dropped rows decode to zeros.
// Every float in the math is IEEE binary32 with round-to-nearest-even (no fused multiply-add), so
// the CPU and the GPU encode to the same bytes. Lossy codecs take finite values: the CPU encoder
// refuses a chunk holding inf or NaN (kInvalidArgument), as its error estimates would not be
// finite and read_chunk_header would refuse them.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "kvf/protocol/status.h"

namespace kvf::protocol {

enum class KvCodec : uint8_t {
  kIdentity = 0,
  kZstd = 1,  // lossless
  kLz4 = 2,   // lossless
  kInt8 = 3,  // per-token int8
  kFp8 = 4,   // per-token scaled fp8 e4m3
  kInt4 = 5,  // KIVI 4-bit
  kInt2 = 6,  // KIVI 2-bit
  kDrop = 7,  // token dropping by key norm
};
inline constexpr int kKvCodecCount = 8;

std::string_view codec_name(
    KvCodec codec);  // "identity", "zstd", "lz4", "int8", "fp8", "int4", "int2", "drop"
// kMalformed naming the known codecs for any other name.
Result<KvCodec> parse_codec(std::string_view name);
bool codec_is_lossless(KvCodec codec);  // identity, zstd, lz4
// identity, int8, fp8, int4, int2: the encoded size depends only on the geometry (the GPU codes these).
bool codec_is_fixed_rate(KvCodec codec);

struct KvCodecParams {
  KvCodec codec = KvCodec::kIdentity;
  uint32_t group = 32;           // int4/int2: tokens (keys) or channels (values) per group
  uint32_t residual_tokens = 0;  // int4/int2: the tile's last tokens kept in bf16
  float keep_fraction = 0.5f;    // drop: the fraction of tokens kept, in (0, 1]
  int zstd_level = 1;
};

// A codec with its options, as benches, policy files and tools write it: the codec's name, then
// optionally ':' and comma-separated key=value options: r (residual_tokens), g (group), keep
// (keep_fraction), level (zstd_level). E.g. "int8", "int4:r=32", "int2:g=64", "drop:keep=0.25".
// kMalformed naming the problem (unknown codec or option, a value that is not a number). Ranges
// are checked later, against a geometry, by validate_codec.
Result<KvCodecParams> parse_codec_spec(std::string_view spec);

// The shape of one chunk's raw bytes (see above).
struct KvChunkGeometry {
  uint32_t layers = 0;
  uint32_t parts = 0;  // 2 (K and V) or 1 (MLA latent)
  uint32_t blocks = 0;
  uint32_t block_tokens = 0;
  uint32_t channels = 0;  // kv_heads * head_dim
  uint32_t dtype_bytes = 2;

  uint32_t tokens() const { return blocks * block_tokens; }
  uint64_t tile_bytes() const;  // tokens * channels * dtype_bytes
  uint64_t raw_bytes() const;   // layers * parts * tile_bytes()
  // kInvalidArgument: a zero count, parts not 1 or 2, dtype_bytes not 2, a size past 2^40.
  Status validate() const;
  bool operator==(const KvChunkGeometry&) const = default;
};

// kInvalidArgument when the codec cannot encode this geometry with these parameters (the reason
// named: e.g. int4 with (tokens - residual) not a multiple of the group).
Status validate_codec(const KvCodecParams& params, const KvChunkGeometry& geometry);
// The tokens a drop codec keeps: ceil(keep_fraction * tokens), at least 1.
uint32_t drop_kept_tokens(const KvCodecParams& params, const KvChunkGeometry& geometry);

inline constexpr uint32_t kKvChunkMagic = 0x4346564B;  // "KVFC"
inline constexpr uint16_t kKvChunkVersion = 1;
inline constexpr uint64_t kKvChunkHeaderBytes = 64;
inline constexpr uint64_t kKvSegmentAlign = 16;

struct KvChunkHeader {
  KvCodecParams params;  // codec, group, residual_tokens, keep_fraction (zstd_level not stored)
  KvChunkGeometry geometry;
  uint32_t kept_tokens = 0;  // drop: rows kept per layer; others: tokens
  float key_error = 0;       // the encoder's relative error of K: ||K - K'|| / ||K|| (0: lossless)
  float value_error = 0;     // the same for V (0 for MLA)
  uint64_t raw_bytes = 0;
  uint64_t payload_bytes = 0;

  uint64_t table_bytes() const { return 16ull * geometry.layers * geometry.parts; }
  uint64_t encoded_bytes() const { return kKvChunkHeaderBytes + table_bytes() + payload_bytes; }
};

struct KvSegment {
  uint64_t offset = 0;  // from the payload's start
  uint64_t length = 0;
};

// Writes the header (64 bytes) into out[0, 64). Precondition: out.size() >= 64.
void write_chunk_header(const KvChunkHeader& header, std::span<uint8_t> out);
// Reads and checks a header: magic, version, a known codec, a valid geometry and codec, raw_bytes
// equal to the geometry's, and encoded_bytes() within `encoded.size()`. kMalformed or
// kUnsupportedVersion with what was wrong.
Result<KvChunkHeader> read_chunk_header(std::span<const uint8_t> encoded);
// Reads segment i's table entry and checks it lies inside the payload. kMalformed otherwise.
Result<KvSegment> read_chunk_segment(const KvChunkHeader& header, std::span<const uint8_t> encoded,
                                     uint32_t index);
void write_chunk_segment(const KvChunkHeader& header, std::span<uint8_t> encoded, uint32_t index,
                         KvSegment segment);

// The exact segment length of a fixed-rate codec's tile (part 0 = keys, 1 = values), and the
// encoded size of a whole chunk for fixed-rate codecs (segments aligned to kKvSegmentAlign).
uint64_t fixed_segment_bytes(const KvCodecParams& params, const KvChunkGeometry& geometry, uint32_t part);
uint64_t fixed_encoded_bytes(const KvCodecParams& params, const KvChunkGeometry& geometry);

inline uint64_t align_segment(uint64_t n) {
  return (n + kKvSegmentAlign - 1) & ~(kKvSegmentAlign - 1);
}

}  // namespace kvf::protocol
