// The GPU KV codecs (kv_codec_cuda.h) against the CPU codec (kv_codec.h): for identity, int8, fp8,
// int4 and int2, over FlashAttention, FlashInfer and MLA layouts with random KV-like bf16 data in
// shuffled paged blocks, a batch of chunks encoded on the GPU must equal, byte for byte, the CPU's
// encode_chunk of each chunk gathered on the host (the two error floats of the header within 1e-3
// relative: the GPU sums in another order); decoding the CPU's bytes on the GPU into poisoned paged
// blocks must leave them equal byte for byte to the CPU's decode_chunk scattered there, poison
// elsewhere untouched. The shapes also take the kernels' other paths: channel counts that are not
// multiples of 8 or are odd, odd token counts, KIVI groups other than 32, residual tokens. The
// contiguous-chunk calls (encode_chunk_cuda/decode_chunk_cuda) likewise, and bad arguments are
// refused. Uses kvf's CUDA wrappers only, so it also builds without CUDA (and skips there).
// The seed is printed; KVF_TEST_SEED=<n> repeats a run.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "catch.h"
#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/kv_codec.h"
#include "kvf/gpudirect/kv_codec_cuda.h"
#include "kvf/gpudirect/kv_codec_math.h"
#include "kvf/protocol/kv_codec.h"
#include "kvf/protocol/kv_layout.h"
#include "paged_copy_fixtures.h"

using namespace kvf;
using namespace kvf::gpudirect;
using namespace kvf::protocol;
using kvf::test::kPoison;

namespace {

constexpr int kDevice = 0;

DeviceBuffer device_buffer(uint64_t bytes) {
  Result<DeviceBuffer> b = DeviceBuffer::allocate(kDevice, bytes);
  INFO(b.status().to_string());
  REQUIRE(b.ok());
  return std::move(b.value());
}

void require_ok(const Status& s) {
  INFO(s.to_string());
  REQUIRE(s.ok());
}

void upload(const DeviceBuffer& dst, const std::vector<uint8_t>& src) {
  REQUIRE(dst.size() >= src.size());
  require_ok(copy_sync(dst.data(), src.data(), src.size()));
}

std::vector<uint8_t> download(const DeviceBuffer& src, uint64_t bytes) {
  std::vector<uint8_t> out(bytes);
  require_ok(copy_sync(out.data(), src.data(), bytes));
  return out;
}

std::mt19937_64& rng() {
  static std::mt19937_64 r(kvf::test::test_seed("test_kv_codec_cuda"));
  return r;
}

// KV-like bf16 rows: normal values with a per-channel scale (a few outlier channels, as keys have),
// some exact zeros of both signs, and now and then an all-zero row (the int8/fp8 scale-0 path).
void fill_kv(uint8_t* p, uint64_t rows, uint32_t channels) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::vector<float> channel_scale(channels);
  for (float& s : channel_scale) s = unit(rng()) < 0.05f ? 8.0f + 8.0f * unit(rng()) : 0.25f + unit(rng());
  for (uint64_t r = 0; r < rows; ++r) {
    const bool zero_row = unit(rng()) < 0.02f;
    for (uint32_t c = 0; c < channels; ++c) {
      float x = zero_row ? 0.0f : normal(rng()) * channel_scale[c];
      const float u = unit(rng());
      if (u < 0.01f) x = 0.0f;
      if (u > 0.99f) x = -0.0f;
      const uint16_t b = codec_math::float_to_bf16(x);
      std::memcpy(p + 2 * (r * channels + c), &b, 2);
    }
  }
}

struct Case {
  std::string name;
  KvLayoutDesc layout;
  KvCodecParams params;
  uint32_t blocks_per_chunk;
  uint32_t chunks;
};

std::string describe(const Case& c) {
  std::ostringstream o;
  o << c.name << ": " << layout_kind_name(c.layout.kind) << " layers " << c.layout.num_layers << " blocks "
    << c.layout.num_blocks << "x" << c.layout.block_tokens << " channels "
    << c.layout.kv_heads * c.layout.head_dim << ", codec " << codec_name(c.params.codec) << " group "
    << c.params.group << " residual " << c.params.residual_tokens << ", " << c.chunks << " chunks of "
    << c.blocks_per_chunk << " blocks";
  return o.str();
}

// Where two encoded chunks first differ, in words: header, table, or which segment and where.
std::string first_difference(const std::vector<uint8_t>& gpu, const std::vector<uint8_t>& cpu, uint64_t begin,
                             uint64_t bytes, const KvChunkGeometry& g, const KvCodecParams& params) {
  for (uint64_t i = 0; i < bytes; ++i) {
    if (gpu[begin + i] == cpu[begin + i]) continue;
    std::ostringstream o;
    o << "first difference at byte " << i << " (gpu " << int{gpu[begin + i]} << ", cpu "
      << int{cpu[begin + i]} << "): ";
    const uint64_t table_end = kKvChunkHeaderBytes + 16ull * g.layers * g.parts;
    if (i < kKvChunkHeaderBytes) {
      o << "header";
    } else if (i < table_end) {
      o << "segment table";
    } else {
      uint64_t at = table_end;
      for (uint32_t s = 0; s < g.layers * g.parts; ++s) {
        const uint64_t len = fixed_segment_bytes(params, g, s % g.parts);
        if (i < at + align_segment(len)) {
          o << "segment " << s << " (layer " << s / g.parts << ", part " << s % g.parts << "), offset "
            << i - at << " of " << len;
          break;
        }
        at += align_segment(len);
      }
    }
    return o.str();
  }
  return "equal";
}

bool close_error(float gpu, float cpu) {
  if (gpu == cpu) return true;
  return std::fabs(gpu - cpu) <= 1e-3f * std::max(std::fabs(gpu), std::fabs(cpu));
}

// One case end to end: paged data on the GPU and mirrored on the host, a batch encoded on the GPU
// against the CPU, the CPU's bytes decoded on the GPU into other (poisoned) blocks.
void run_case(const Case& c) {
  INFO(describe(c));
  const KvLayout layout = kvf::test::make_layout(c.layout);
  const KvLayoutDesc& d = c.layout;
  const uint32_t parts = layout.parts();
  const uint32_t channels = d.kv_heads * d.head_dim;
  const KvChunkGeometry geo{d.num_layers, parts, c.blocks_per_chunk, d.block_tokens, channels, 2};
  REQUIRE(validate_codec(c.params, geo).ok());
  const uint64_t chunk_bytes = fixed_encoded_bytes(c.params, geo);
  const uint64_t batch_blocks = uint64_t{c.chunks} * c.blocks_per_chunk;
  REQUIRE(2 * batch_blocks <= d.num_blocks);

  // The engine's layers: random data everywhere, on the host and the GPU.
  std::vector<std::vector<uint8_t>> host(d.num_layers, std::vector<uint8_t>(layout.layer_bytes()));
  std::vector<DeviceBuffer> dev;
  std::vector<void*> bases;
  for (uint32_t l = 0; l < d.num_layers; ++l) {
    fill_kv(host[l].data(), layout.layer_bytes() / (2ull * channels), channels);
    dev.push_back(device_buffer(layout.layer_bytes()));
    upload(dev.back(), host[l]);
    bases.push_back(dev.back().data());
  }
  // Shuffled block ids: the first half of a permutation is encoded, the second half decoded into.
  std::vector<uint32_t> perm(d.num_blocks);
  std::iota(perm.begin(), perm.end(), 0u);
  std::shuffle(perm.begin(), perm.end(), rng());
  const std::vector<uint32_t> src_ids(perm.begin(), perm.begin() + static_cast<long>(batch_blocks));
  const std::vector<uint32_t> dst_ids(perm.begin() + static_cast<long>(batch_blocks),
                                      perm.begin() + static_cast<long>(2 * batch_blocks));

  // The CPU reference: each chunk gathered in store order, encoded.
  std::vector<std::vector<uint8_t>> raw(c.chunks, std::vector<uint8_t>(geo.raw_bytes()));
  std::vector<uint8_t> cpu(chunk_bytes * c.chunks);
  for (uint32_t i = 0; i < c.chunks; ++i) {
    uint64_t at = 0;
    for (uint32_t l = 0; l < d.num_layers; ++l) {
      for (uint32_t b = 0; b < c.blocks_per_chunk; ++b) {
        for (uint32_t p = 0; p < parts; ++p) {
          const ByteExtent e = layout.extent(src_ids[i * c.blocks_per_chunk + b], static_cast<KvPart>(p));
          std::memcpy(raw[i].data() + at, host[l].data() + e.offset, e.length);
          at += e.length;
        }
      }
    }
    REQUIRE(at == geo.raw_bytes());
    Result<uint64_t> n =
        encode_chunk(c.params, geo, raw[i], std::span<uint8_t>(cpu).subspan(i * chunk_bytes, chunk_bytes));
    INFO(n.status().to_string());
    REQUIRE(n.ok());
    REQUIRE(n.value() == chunk_bytes);
  }

  Result<CudaStream> stream = CudaStream::create(kDevice);
  INFO(stream.status().to_string());
  REQUIRE(stream.ok());

  // GPU encode of the whole batch from the paged blocks.
  DeviceBuffer out = device_buffer(chunk_bytes * c.chunks);
  require_ok(fill_device(out.data(), 0xEE, out.size()));  // padding must come out zero, not stale
  const PagedChunks src{d, bases, src_ids, c.blocks_per_chunk};
  require_ok(encode_paged_chunks_cuda(c.params, src, out.data(), stream->handle()));
  require_ok(stream->synchronize());
  const std::vector<uint8_t> gpu = download(out, out.size());
  for (uint32_t i = 0; i < c.chunks; ++i) {
    INFO("chunk " << i);
    const uint64_t base = i * chunk_bytes;
    // The error floats (header bytes 40..48) within 1e-3; every other byte equal.
    Result<KvChunkHeader> gh = read_chunk_header(std::span<const uint8_t>(gpu).subspan(base, chunk_bytes));
    Result<KvChunkHeader> ch = read_chunk_header(std::span<const uint8_t>(cpu).subspan(base, chunk_bytes));
    INFO(gh.status().to_string());
    REQUIRE(gh.ok());
    REQUIRE(ch.ok());
    INFO("key_error gpu " << gh->key_error << " cpu " << ch->key_error << ", value_error gpu "
                          << gh->value_error << " cpu " << ch->value_error);
    CHECK(close_error(gh->key_error, ch->key_error));
    CHECK(close_error(gh->value_error, ch->value_error));
    std::vector<uint8_t> g_masked(gpu.begin() + static_cast<long>(base),
                                  gpu.begin() + static_cast<long>(base + chunk_bytes));
    std::vector<uint8_t> c_masked(cpu.begin() + static_cast<long>(base),
                                  cpu.begin() + static_cast<long>(base + chunk_bytes));
    std::fill(g_masked.begin() + 40, g_masked.begin() + 48, uint8_t{0});
    std::fill(c_masked.begin() + 40, c_masked.begin() + 48, uint8_t{0});
    const bool equal = g_masked == c_masked;
    INFO(first_difference(g_masked, c_masked, 0, chunk_bytes, geo, c.params));
    CHECK(equal);
  }

  // GPU decode of the CPU's bytes into poisoned blocks; the CPU's decode scattered there is the
  // expected image, poison everywhere else.
  DeviceBuffer encoded = device_buffer(cpu.size());
  upload(encoded, cpu);
  std::vector<std::vector<uint8_t>> expected(d.num_layers,
                                             std::vector<uint8_t>(layout.layer_bytes(), kPoison));
  for (uint32_t l = 0; l < d.num_layers; ++l) require_ok(fill_device(dev[l].data(), kPoison, dev[l].size()));
  for (uint32_t i = 0; i < c.chunks; ++i) {
    std::vector<uint8_t> decoded(geo.raw_bytes());
    require_ok(decode_chunk(std::span<const uint8_t>(cpu).subspan(i * chunk_bytes, chunk_bytes), decoded));
    uint64_t at = 0;
    for (uint32_t l = 0; l < d.num_layers; ++l) {
      for (uint32_t b = 0; b < c.blocks_per_chunk; ++b) {
        for (uint32_t p = 0; p < parts; ++p) {
          const ByteExtent e = layout.extent(dst_ids[i * c.blocks_per_chunk + b], static_cast<KvPart>(p));
          std::memcpy(expected[l].data() + e.offset, decoded.data() + at, e.length);
          at += e.length;
        }
      }
    }
  }
  const PagedChunks dst{d, bases, dst_ids, c.blocks_per_chunk};
  require_ok(decode_paged_chunks_cuda(c.params, dst, encoded.data(), stream->handle()));
  require_ok(stream->synchronize());
  for (uint32_t l = 0; l < d.num_layers; ++l) {
    const std::vector<uint8_t> got = download(dev[l], dev[l].size());
    const auto diff = std::mismatch(got.begin(), got.end(), expected[l].begin());
    INFO("layer " << l << ": first difference at byte "
                  << (diff.first == got.end() ? -1 : static_cast<long>(diff.first - got.begin())));
    CHECK(diff.first == got.end());
  }

  // The contiguous-chunk calls over the first chunk's raw bytes.
  DeviceBuffer raw_dev = device_buffer(geo.raw_bytes());
  upload(raw_dev, raw[0]);
  DeviceBuffer one = device_buffer(chunk_bytes);
  require_ok(encode_chunk_cuda(c.params, geo, raw_dev.data(), one.data(), stream->handle()));
  require_ok(stream->synchronize());
  std::vector<uint8_t> one_gpu = download(one, chunk_bytes);
  std::vector<uint8_t> one_cpu(cpu.begin(), cpu.begin() + static_cast<long>(chunk_bytes));
  std::fill(one_gpu.begin() + 40, one_gpu.begin() + 48, uint8_t{0});
  std::fill(one_cpu.begin() + 40, one_cpu.begin() + 48, uint8_t{0});
  {
    INFO("encode_chunk_cuda: " << first_difference(one_gpu, one_cpu, 0, chunk_bytes, geo, c.params));
    CHECK(one_gpu == one_cpu);
  }
  require_ok(fill_device(raw_dev.data(), kPoison, raw_dev.size()));
  require_ok(decode_chunk_cuda(c.params, geo, encoded.data(), raw_dev.data(), stream->handle()));
  require_ok(stream->synchronize());
  std::vector<uint8_t> decoded(geo.raw_bytes());
  require_ok(decode_chunk(std::span<const uint8_t>(cpu).subspan(0, chunk_bytes), decoded));
  CHECK((download(raw_dev, geo.raw_bytes()) == decoded));
}

KvCodecParams codec(KvCodec k, uint32_t group = 32, uint32_t residual = 0) {
  KvCodecParams p;
  p.codec = k;
  p.group = group;
  p.residual_tokens = residual;
  return p;
}

constexpr KvCodec kFixedRate[] = {KvCodec::kIdentity, KvCodec::kInt8, KvCodec::kFp8, KvCodec::kInt4,
                                  KvCodec::kInt2};

}  // namespace

TEST_CASE("GPU codecs equal the CPU codec on paged FlashAttention/FlashInfer/MLA blocks", "[gpu][codec]") {
  // 64-token chunks (4 blocks of 16), 3 per batch; 2 KV heads x 64 (128 channels) or an MLA latent
  // of 72 (rows of 144 bytes: 16-byte aligned, not a multiple of 128 channels).
  const KvLayoutDesc shapes[] = {
      {KvLayoutKind::kFlashAttention, 3, 40, 16, 2, 64, 2},
      {KvLayoutKind::kFlashInfer, 3, 40, 16, 2, 64, 2},
      {KvLayoutKind::kMla, 3, 40, 16, 1, 72, 2},
  };
  for (const KvLayoutDesc& shape : shapes) {
    for (KvCodec k : kFixedRate) {
      run_case({"basic", shape, codec(k), 4, 3});
    }
  }
}

TEST_CASE("GPU KIVI codecs with groups other than 32 and residual tokens", "[gpu][codec]") {
  const KvLayoutDesc fa{KvLayoutKind::kFlashAttention, 2, 80, 16, 2, 64, 2};
  const KvLayoutDesc fi{KvLayoutKind::kFlashInfer, 2, 80, 16, 2, 64, 2};
  const KvLayoutDesc mla{KvLayoutKind::kMla, 2, 80, 16, 1, 72, 2};
  for (KvCodec k : {KvCodec::kInt4, KvCodec::kInt2}) {
    for (const KvLayoutDesc& shape : {fa, fi, mla}) {
      run_case({"group 64", shape, codec(k, 64), 4, 3});  // the generic keys path
      run_case({"group 8", shape, codec(k, 8), 4, 3});
      run_case({"group 16, residual 16", shape, codec(k, 16, 16), 4, 3});
      run_case({"group 32, residual 32", shape, codec(k, 32, 32), 4, 3});
      run_case({"all residual", shape, codec(k, 32, 64), 4, 2});  // no quantized tokens
      // Keys over 512 tokens: row tables of 256 at a time. Values would need 512 | channels: MLA only.
      if (shape.kind == KvLayoutKind::kMla) run_case({"group 512", shape, codec(k, 512), 32, 1});
    }
  }
}

TEST_CASE("GPU codecs on shapes off the vector paths", "[gpu][codec]") {
  // 3 heads x 4 (12 channels: 8-byte rows, not whole 16-byte vectors), 3 x 8 (24) in 3-token blocks
  // (odd token counts), MLA latents of 36 (8-byte rows) and 37 (odd: 2-byte rows, one channel per
  // KIVI key thread).
  const KvLayoutDesc shapes[] = {
      {KvLayoutKind::kFlashAttention, 2, 30, 16, 3, 4, 2},
      {KvLayoutKind::kFlashInfer, 2, 30, 3, 3, 8, 2},
      {KvLayoutKind::kMla, 2, 30, 16, 1, 36, 2},
      {KvLayoutKind::kMla, 2, 30, 3, 1, 37, 2},
  };
  for (const KvLayoutDesc& shape : shapes) {
    const uint32_t channels = shape.kv_heads * shape.head_dim;
    for (KvCodec k : kFixedRate) {
      if (k == KvCodec::kInt4 || k == KvCodec::kInt2) {
        // 5 blocks of 16 (80 tokens) or of 3 (15): the group and residual that fit.
        const uint32_t tokens = shape.block_tokens * 5;
        const uint32_t group = 8;
        if (shape.kind != KvLayoutKind::kMla && channels % group != 0) continue;  // values need C % G == 0
        run_case({"odd shape", shape, codec(k, group, tokens % group), 5, 2});
      } else {
        run_case({"odd shape", shape, codec(k), 5, 2});
        run_case({"odd shape, 3 blocks", shape, codec(k), 3, 3});
      }
    }
  }
}

TEST_CASE("GPU codecs on a Llama-3-8B-like batch (the fast paths)", "[gpu][codec]") {
  // 8 KV heads x 128 = 1024 channels, 16-token blocks, 256-token chunks, 4 chunks of 2 layers.
  const KvLayoutDesc shape{KvLayoutKind::kFlashAttention, 2, 160, 16, 8, 128, 2};
  for (KvCodec k : kFixedRate) run_case({"llama", shape, codec(k), 16, 4});
}

TEST_CASE("GPU codecs refuse bad arguments", "[gpu][codec]") {
  const KvLayoutDesc d{KvLayoutKind::kFlashAttention, 2, 16, 16, 2, 64, 2};
  const KvLayout layout = kvf::test::make_layout(d);
  DeviceBuffer l0 = device_buffer(layout.layer_bytes());
  DeviceBuffer l1 = device_buffer(layout.layer_bytes());
  require_ok(fill_device(l0.data(), 0x3c, l0.size()));  // defined bytes for the calls that run
  require_ok(fill_device(l1.data(), 0x3c, l1.size()));
  const KvChunkGeometry geo{2, 2, 2, 16, 128, 2};
  DeviceBuffer out = device_buffer(fixed_encoded_bytes(codec(KvCodec::kInt8), geo) * 2 + 64);
  std::vector<void*> bases = {l0.data(), l1.data()};
  const std::vector<uint32_t> ids = {3, 1, 4, 5};
  const PagedChunks good{d, bases, ids, 2};
  Result<CudaStream> stream = CudaStream::create(kDevice);
  REQUIRE(stream.ok());
  void* s = stream->handle();
  auto refused = [](const Status& st) {
    INFO(st.to_string());
    return st.code() == ErrorCode::kInvalidArgument;
  };

  require_ok(encode_paged_chunks_cuda(codec(KvCodec::kInt8), good, out.data(), s));
  require_ok(stream->synchronize());

  CHECK(refused(encode_paged_chunks_cuda(codec(KvCodec::kZstd), good, out.data(), s)));  // not fixed-rate
  CHECK(refused(encode_paged_chunks_cuda(codec(KvCodec::kDrop), good, out.data(), s)));
  CHECK(refused(encode_paged_chunks_cuda(codec(KvCodec::kInt4, 24), good, out.data(), s)));  // 32 tokens % 24
  CHECK(refused(encode_paged_chunks_cuda(codec(KvCodec::kInt4, 32, 16), good, out.data(), s)));  // 16 % 32
  CHECK(refused(encode_paged_chunks_cuda(codec(KvCodec::kInt8), good, nullptr, s)));
  CHECK(refused(
      encode_paged_chunks_cuda(codec(KvCodec::kInt8), good, static_cast<uint8_t*>(out.data()) + 8, s)));
  CHECK(refused(decode_paged_chunks_cuda(codec(KvCodec::kInt8), good, nullptr, s)));

  KvLayoutDesc fp8_layout = d;
  fp8_layout.dtype_bytes = 1;
  CHECK(refused(encode_paged_chunks_cuda(codec(KvCodec::kInt8), PagedChunks{fp8_layout, bases, ids, 2},
                                         out.data(), s)));
  const std::vector<uint32_t> past = {3, 1, 4, 16};
  CHECK(refused(
      encode_paged_chunks_cuda(codec(KvCodec::kInt8), PagedChunks{d, bases, past, 2}, out.data(), s)));
  const std::vector<uint32_t> repeated = {3, 1, 4, 3};
  CHECK(refused(
      decode_paged_chunks_cuda(codec(KvCodec::kInt8), PagedChunks{d, bases, repeated, 2}, out.data(), s)));
  require_ok(
      encode_paged_chunks_cuda(codec(KvCodec::kInt8), PagedChunks{d, bases, repeated, 2}, out.data(), s));
  const std::vector<uint32_t> three = {3, 1, 4};
  CHECK(refused(
      encode_paged_chunks_cuda(codec(KvCodec::kInt8), PagedChunks{d, bases, three, 2}, out.data(), s)));
  CHECK(
      refused(encode_paged_chunks_cuda(codec(KvCodec::kInt8), PagedChunks{d, bases, {}, 2}, out.data(), s)));
  CHECK(
      refused(encode_paged_chunks_cuda(codec(KvCodec::kInt8), PagedChunks{d, bases, ids, 0}, out.data(), s)));
  std::vector<void*> one_base = {l0.data()};
  CHECK(refused(
      encode_paged_chunks_cuda(codec(KvCodec::kInt8), PagedChunks{d, one_base, ids, 2}, out.data(), s)));
  std::vector<void*> null_base = {l0.data(), nullptr};
  CHECK(refused(
      encode_paged_chunks_cuda(codec(KvCodec::kInt8), PagedChunks{d, null_base, ids, 2}, out.data(), s)));
  std::vector<void*> odd_base = {l0.data(), static_cast<uint8_t*>(l1.data()) + 2};
  CHECK(refused(
      encode_paged_chunks_cuda(codec(KvCodec::kInt8), PagedChunks{d, odd_base, ids, 2}, out.data(), s)));
  KvLayoutDesc bad_layout = d;
  bad_layout.num_layers = 0;
  CHECK(refused(encode_paged_chunks_cuda(codec(KvCodec::kInt8), PagedChunks{bad_layout, bases, ids, 2},
                                         out.data(), s)));

  CHECK(refused(encode_chunk_cuda(codec(KvCodec::kInt8), geo, nullptr, out.data(), s)));
  CHECK(refused(
      encode_chunk_cuda(codec(KvCodec::kInt8), geo, static_cast<uint8_t*>(l0.data()) + 4, out.data(), s)));
  CHECK(refused(encode_chunk_cuda(codec(KvCodec::kLz4), geo, l0.data(), out.data(), s)));
  KvChunkGeometry bad_geo = geo;
  bad_geo.dtype_bytes = 4;
  CHECK(refused(encode_chunk_cuda(codec(KvCodec::kInt8), bad_geo, l0.data(), out.data(), s)));
  CHECK(refused(decode_chunk_cuda(codec(KvCodec::kInt8), geo, out.data(), nullptr, s)));
  CHECK(refused(decode_chunk_cuda(codec(KvCodec::kInt8), geo, nullptr, l0.data(), s)));
  require_ok(stream->synchronize());
}
