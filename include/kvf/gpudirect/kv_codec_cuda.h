// The fixed-rate KV codecs (identity, int8, fp8, int4, int2) on the GPU, fused with the paged
// block copies: encoding reads a chunk's blocks straight out of an engine's paged layer buffers
// (the gather) and decoding writes straight into them (the scatter), so a compressed chunk costs
// no extra pass over memory. The encoded bytes equal the CPU codec's (gpudirect/kv_codec.h) byte
// for byte, header and error estimates aside (the GPU sums errors in another order).
// Without CUDA every call is kUnavailable. Thread rules: calls are asynchronous on `stream`;
// callers keep buffers alive until the stream has passed the work; any thread. Each call uploads a
// small descriptor (layer bases, block ids, header template) from one of 8 pinned slots per device,
// so a ninth call in flight on a device waits on the host for the oldest one's kernels.
// Pointers (layer bases, raw chunks, encoded buffers) must be 16-byte aligned, as cudaMalloc's are.
#pragma once

#include <cstdint>
#include <span>

#include "kvf/protocol/kv_codec.h"
#include "kvf/protocol/kv_layout.h"
#include "kvf/protocol/status.h"

namespace kvf::gpudirect {

// Where a batch of chunks lives in an engine's paged KV cache: `layer_base[l]` is layer l's
// device buffer (laid out as `layout` says), and chunk i is made of the blocks
// block_ids[i * blocks_per_chunk, (i + 1) * blocks_per_chunk), in token order.
struct PagedChunks {
  protocol::KvLayoutDesc layout;
  std::span<void* const> layer_base;    // layout.num_layers device pointers (host array)
  std::span<const uint32_t> block_ids;  // chunks * blocks_per_chunk (host array)
  uint32_t blocks_per_chunk = 0;
};

// Encodes every chunk into out_device + i * fixed_encoded_bytes(params, geometry) (header, segment
// table and the zero padding between segments written too; the header's error estimates are summed
// on the GPU), a few launches for the whole batch. kInvalidArgument for a codec that is not
// fixed-rate or parameters validate_codec refuses for the chunk's geometry, a layout that is not
// 16-bit, a block id past the layout, a layer_base count other than num_layers, block ids that are
// not whole chunks, a null or misaligned pointer; kUnavailable without CUDA or a GPU. A lossy
// chunk holding inf or NaN (which the CPU codec refuses to encode) gets NaN error estimates, so its
// header fails read_chunk_header.
Status encode_paged_chunks_cuda(const protocol::KvCodecParams& params, const PagedChunks& chunks,
                                void* out_device, void* cuda_stream);
// Decodes `chunks.block_ids.size() / blocks_per_chunk` encoded chunks laid out as above into the
// paged blocks. The caller has checked the headers (read_chunk_header on a host copy) and that they
// name `params`' codec; the kernels trust the fixed layout. The same errors as encoding, and
// kInvalidArgument for a block id that repeats (two rows would land in one place).
Status decode_paged_chunks_cuda(const protocol::KvCodecParams& params, const PagedChunks& chunks,
                                const void* encoded_device, void* cuda_stream);

// The same over one contiguous raw chunk in device memory (store order), for benchmarks and tests:
// the same kernels, addressing the raw chunk as blocks 0..blocks-1 of one "layer buffer" per layer.
Status encode_chunk_cuda(const protocol::KvCodecParams& params, const protocol::KvChunkGeometry& geometry,
                         const void* raw_device, void* out_device, void* cuda_stream);
Status decode_chunk_cuda(const protocol::KvCodecParams& params, const protocol::KvChunkGeometry& geometry,
                         const void* encoded_device, void* raw_device, void* cuda_stream);

}  // namespace kvf::gpudirect
