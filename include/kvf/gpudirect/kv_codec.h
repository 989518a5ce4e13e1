// The KV codecs on the CPU: encode a chunk's raw bytes (protocol/kv_codec.h gives the order and
// the encoded format) and decode them back, and measure what a lossy codec changed. Used by the
// store (/compress, spills), by host-memory engines and as the reference the GPU codecs must match
// byte for byte. Pure functions over caller-owned buffers; safe from any thread at once.
#pragma once

#include <cstdint>
#include <span>

#include "kvf/protocol/kv_codec.h"
#include "kvf/protocol/status.h"

namespace kvf::gpudirect {

// An upper bound of encode_chunk's output for any input of this geometry (exact for fixed-rate
// codecs). kInvalidArgument where validate_codec fails.
Result<uint64_t> max_encoded_bytes(const protocol::KvCodecParams& params,
                                   const protocol::KvChunkGeometry& geometry);

// Encodes `raw` (geometry.raw_bytes() long) into `out` (at least max_encoded_bytes long); returns
// the bytes written. The header records the encoder's relative errors of K and V.
// Errors: kInvalidArgument (params/geometry, sizes).
Result<uint64_t> encode_chunk(const protocol::KvCodecParams& params,
                              const protocol::KvChunkGeometry& geometry, std::span<const uint8_t> raw,
                              std::span<uint8_t> out);

// Decodes an encoded chunk into `raw` (exactly its header's raw_bytes long). Any malformed input
// (bad header, table, segment sizes, corrupt compressed data, positions out of order or range)
// is kMalformed / kUnsupportedVersion and leaves `raw` unspecified; never reads or writes out of
// bounds. kInvalidArgument when `raw` has the wrong size.
Status decode_chunk(std::span<const uint8_t> encoded, std::span<uint8_t> raw);

// Rows: the int8 / fp8 segment of protocol/kv_codec.h for any run of whole token rows, the form
// in which a stream moves KV (a block part is block_tokens rows of `channels` bf16 values,
// token-major, so any whole-row run of it can be encoded on its own): `rows` float32 scales, then
// rows x channels codes, the bytes the chunk codec writes for those rows (it encodes each block's
// rows with these). encoded_rows_bytes = rows x (4 + channels).
uint64_t encoded_rows_bytes(uint32_t channels, uint64_t rows);
// Encodes `rows` rows from `src` (rows x channels x 2 bytes) into `dst` (at least
// encoded_rows_bytes). kInvalidArgument: a codec other than int8/fp8, no channels, spans too small,
// or a row holding a value that is not finite (named; dst is then unspecified).
Status encode_rows(protocol::KvCodec codec, uint32_t channels, std::span<const uint8_t> src, uint64_t rows,
                   std::span<uint8_t> dst);
// Decodes encode_rows' output back into `dst` (rows x channels x 2 bytes). Any bytes decode (a
// corrupt scale gives garbage values, never an access out of bounds); kInvalidArgument as above.
Status decode_rows(protocol::KvCodec codec, uint32_t channels, std::span<const uint8_t> src, uint64_t rows,
                   std::span<uint8_t> dst);

// What a lossy codec changed, comparing a chunk's raw bytes with its decoded bytes.
struct KvErrorStats {
  double key_relative = 0;    // ||K - K'||_2 / ||K||_2 over every layer (0 when K is all zero)
  double value_relative = 0;  // the same for V (0 for MLA)
  double max_abs = 0;         // largest |x - x'| over every value
};
Result<KvErrorStats> compare_chunks(const protocol::KvChunkGeometry& geometry,
                                    std::span<const uint8_t> original, std::span<const uint8_t> decoded);

}  // namespace kvf::gpudirect
