// The row codec (gpudirect/kv_codec.h: encode_rows / decode_rows), the form in which the ucx_staged
// transport sends int8 / fp8 KV: its bytes equal a literal, one-value-at-a-time transcription of
// protocol/kv_codec.h over kv_codec_math.h and equal the chunk codec's segment for the same rows
// (scales and codes of each block); decode_rows equals decode_chunk for them; all-zero rows, odd
// channel counts (the lanes' tails) and single rows work; wrong codecs, sizes and non-finite
// values are refused, naming what was wrong.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "catch.h"
#include "kvf/gpudirect/kv_codec.h"
#include "kvf/gpudirect/kv_codec_math.h"

using namespace kvf;
using protocol::KvCodec;
namespace cm = kvf::codec_math;

namespace {

// KV-like bf16: magnitudes 2^-9 .. 2^4, some rows all zero, a few outliers.
std::vector<uint8_t> kv_values(uint64_t values, uint32_t channels, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> out(values * 2);
  for (uint64_t i = 0; i < values; ++i) {
    const uint64_t r = rng();
    uint32_t exponent = 118u + static_cast<uint32_t>(r % 10);
    if ((r >> 40) % 97 == 0) exponent += 6;
    const auto v = static_cast<uint16_t>((r >> 8 & 0x8000u) | exponent << 7 | (r >> 20 & 0x7fu));
    std::memcpy(out.data() + 2 * i, &v, 2);
  }
  for (uint64_t row = 3; row * channels < values; row += 11)
    std::memset(out.data() + row * channels * 2, 0, channels * 2ull);
  return out;
}

// protocol/kv_codec.h's int8 / fp8 segment for `rows` rows, one value at a time.
std::vector<uint8_t> literal_encode(KvCodec codec, uint32_t channels, const std::vector<uint8_t>& raw,
                                    uint64_t rows) {
  const bool fp8 = codec == KvCodec::kFp8;
  std::vector<uint8_t> out(rows * (4 + channels));
  for (uint64_t t = 0; t < rows; ++t) {
    float absmax = 0;
    for (uint32_t c = 0; c < channels; ++c) {
      uint16_t b;
      std::memcpy(&b, raw.data() + (t * channels + c) * 2, 2);
      absmax = cm::max_value(absmax, cm::abs_value(cm::bf16_to_float(b)));
    }
    const float scale = cm::div(absmax, fp8 ? 448.0f : 127.0f);
    std::memcpy(out.data() + 4 * t, &scale, 4);
    for (uint32_t c = 0; c < channels; ++c) {
      uint16_t b;
      std::memcpy(&b, raw.data() + (t * channels + c) * 2, 2);
      uint8_t code = 0;
      if (scale != 0.0f) {
        const float v = cm::div(cm::bf16_to_float(b), scale);
        code = fp8 ? cm::float_to_e4m3(v)
                   : static_cast<uint8_t>(
                         static_cast<int32_t>(cm::clamp_value(cm::round_even(v), -127.0f, 127.0f)));
      }
      out[4 * rows + t * channels + c] = code;
    }
  }
  return out;
}

}  // namespace

TEST_CASE("encode_rows: the spec's bytes, and the chunk codec's segment for the same rows") {
  const KvCodec codec = GENERATE(KvCodec::kInt8, KvCodec::kFp8);
  const uint32_t channels = GENERATE(1u, 3u, 17u, 128u, 1024u);
  CAPTURE(protocol::codec_name(codec), channels);
  protocol::KvChunkGeometry g{2, 2, 3, 5, channels, 2};  // 2 layers x K/V x 3 blocks of 5 tokens
  const std::vector<uint8_t> raw = kv_values(g.raw_bytes() / 2, channels, channels);
  const protocol::KvCodecParams params{codec};
  std::vector<uint8_t> chunk(gpudirect::max_encoded_bytes(params, g).value());
  REQUIRE(gpudirect::encode_chunk(params, g, raw, chunk).ok());
  auto header = protocol::read_chunk_header(chunk);
  REQUIRE(header.ok());
  std::vector<uint8_t> decoded_chunk(g.raw_bytes());
  REQUIRE(gpudirect::decode_chunk(chunk, decoded_chunk).ok());
  const uint64_t row_bytes = uint64_t{channels} * 2, run = g.block_tokens;
  const uint64_t payload = protocol::kKvChunkHeaderBytes + header->table_bytes();
  for (uint32_t layer = 0; layer < g.layers; ++layer) {
    for (uint32_t part = 0; part < g.parts; ++part) {
      auto seg = protocol::read_chunk_segment(header.value(), chunk, layer * g.parts + part);
      REQUIRE(seg.ok());
      const uint8_t* scales = chunk.data() + payload + seg->offset;
      const uint8_t* codes = scales + 4ull * g.tokens();
      for (uint32_t b = 0; b < g.blocks; ++b) {
        // Block b of tile (layer, part): its rows lie together in the chunk's raw bytes.
        const uint64_t at = ((uint64_t{layer} * g.blocks + b) * g.parts + part) * run * row_bytes;
        const std::vector<uint8_t> rows(raw.begin() + static_cast<std::ptrdiff_t>(at),
                                        raw.begin() + static_cast<std::ptrdiff_t>(at + run * row_bytes));
        std::vector<uint8_t> out(gpudirect::encoded_rows_bytes(channels, run));
        REQUIRE(out.size() == run * (4 + channels));
        REQUIRE(gpudirect::encode_rows(codec, channels, rows, run, out).ok());
        REQUIRE(out == literal_encode(codec, channels, rows, run));
        REQUIRE(std::memcmp(out.data(), scales + 4ull * b * run, 4 * run) == 0);
        REQUIRE(std::memcmp(out.data() + 4 * run, codes + uint64_t{b} * run * channels, run * channels) == 0);
        std::vector<uint8_t> back(run * row_bytes, 0xA5);
        REQUIRE(gpudirect::decode_rows(codec, channels, out, run, back).ok());
        REQUIRE(std::memcmp(back.data(), decoded_chunk.data() + at, back.size()) == 0);
      }
    }
  }
}

TEST_CASE("encode_rows: zero rows, one row, long runs") {
  const KvCodec codec = GENERATE(KvCodec::kInt8, KvCodec::kFp8);
  const uint32_t channels = 1024;
  std::vector<uint8_t> zeros(4 * channels * 2, 0), out(gpudirect::encoded_rows_bytes(channels, 4), 0xff);
  REQUIRE(gpudirect::encode_rows(codec, channels, zeros, 4, out).ok());
  REQUIRE(std::all_of(out.begin(), out.end(), [](uint8_t b) { return b == 0; }));  // scale 0, codes 0
  std::vector<uint8_t> back(zeros.size(), 0xA5);
  REQUIRE(gpudirect::decode_rows(codec, channels, out, 4, back).ok());
  REQUIRE(back == zeros);

  const uint64_t rows = 4096;  // 8 MiB of rows, as a staging slot holds them
  const std::vector<uint8_t> raw = kv_values(rows * channels, channels, 5);
  std::vector<uint8_t> encoded(gpudirect::encoded_rows_bytes(channels, rows));
  REQUIRE(gpudirect::encode_rows(codec, channels, raw, rows, encoded).ok());
  REQUIRE(encoded == literal_encode(codec, channels, raw, rows));
  std::vector<uint8_t> one(gpudirect::encoded_rows_bytes(channels, 1));
  const std::vector<uint8_t> row(raw.begin() + 2 * channels * 77, raw.begin() + 2 * channels * 78);
  REQUIRE(gpudirect::encode_rows(codec, channels, row, 1, one).ok());
  REQUIRE(std::memcmp(one.data(), encoded.data() + 4 * 77, 4) == 0);
  REQUIRE(std::memcmp(one.data() + 4, encoded.data() + 4 * rows + 77 * channels, channels) == 0);
  // Lossy, but close: every decoded value within half a step of its row's scale.
  std::vector<uint8_t> decoded(raw.size());
  REQUIRE(gpudirect::decode_rows(codec, channels, encoded, rows, decoded).ok());
  for (uint64_t t = 0; t < rows; t += 97) {
    float scale;
    std::memcpy(&scale, encoded.data() + 4 * t, 4);
    for (uint32_t c = 0; c < channels; ++c) {
      uint16_t a, b;
      std::memcpy(&a, raw.data() + (t * channels + c) * 2, 2);
      std::memcpy(&b, decoded.data() + (t * channels + c) * 2, 2);
      const float x = cm::bf16_to_float(a), y = cm::bf16_to_float(b);
      // int8: half a step of the scale; fp8: 1/16 of the value (3 mantissa bits) or a subnormal step.
      const float bound =
          codec == KvCodec::kInt8 ? 0.51f * scale : std::max(std::fabs(x) / 15.0f, scale / 500.0f);
      REQUIRE(std::fabs(x - y) <= bound * 1.01f + std::fabs(x) / 128.0f);
    }
  }
}

TEST_CASE("encode_rows / decode_rows refuse wrong codecs, sizes and non-finite values") {
  const uint32_t channels = 64;
  std::vector<uint8_t> raw = kv_values(8 * channels, channels, 9),
                       encoded(gpudirect::encoded_rows_bytes(channels, 8));
  auto says = [](const Status& s, const std::string& what) {
    CAPTURE(s.to_string());
    REQUIRE(s.code() == ErrorCode::kInvalidArgument);
    REQUIRE(s.message().find(what) != std::string::npos);
  };
  says(gpudirect::encode_rows(KvCodec::kIdentity, channels, raw, 8, encoded), "int8 or fp8, not identity");
  says(gpudirect::decode_rows(KvCodec::kZstd, channels, encoded, 8, raw), "int8 or fp8, not zstd");
  says(gpudirect::encode_rows(KvCodec::kInt8, 0, raw, 8, encoded), "0 channels");
  says(gpudirect::encode_rows(KvCodec::kInt8, channels, std::span(raw).first(raw.size() - 2), 8, encoded),
       "need 1024 raw and 544 encoded bytes, got 1022 and 544");
  says(gpudirect::encode_rows(KvCodec::kInt8, channels, raw, 8, std::span(encoded).first(543)),
       "got 1024 and 543");
  says(gpudirect::decode_rows(KvCodec::kFp8, channels, std::span(encoded).first(10), 8, raw),
       "got 1024 and 10");
  for (const uint16_t bad : {uint16_t{0x7f80}, uint16_t{0xff80}, uint16_t{0x7fc1}}) {  // +inf, -inf, NaN
    std::vector<uint8_t> copy = raw;
    std::memcpy(copy.data() + (5 * channels + 9) * 2, &bad, 2);
    says(gpudirect::encode_rows(KvCodec::kFp8, channels, copy, 8, encoded),
         "row 5 holds a value that is not finite");
    says(gpudirect::encode_rows(KvCodec::kInt8, channels, copy, 8, encoded),
         "row 5 holds a value that is not finite");
  }
  // Garbage decodes to garbage, in bounds.
  std::vector<uint8_t> junk(encoded.size());
  std::mt19937 rng(1);
  for (auto& b : junk) b = static_cast<uint8_t>(rng());
  REQUIRE(gpudirect::decode_rows(KvCodec::kInt8, channels, junk, 8, raw).ok());
  REQUIRE(gpudirect::decode_rows(KvCodec::kFp8, channels, junk, 8, raw).ok());
}
